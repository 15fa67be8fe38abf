"""What a run trains: a distilled student or a CNN teacher, as task objects.

A task knows how to describe its network (:class:`~cskd.checkpoint.ModelSpec`), build it, score a
batch, name and compute its evaluation heads, extract and reload its weights, and what of it gets
deployed. Training, evaluation and export ask the task instead of branching on role strings.
Tasks are registered by the name ``train.target`` and a checkpoint's ``role`` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn as nn

from cskd.checkpoint import ModelSpec, load_strict, load_weights, resolve_checkpoint
from cskd.errors import CSKDError, did_you_mean
from cskd.loss import CSKDLoss, needs_teacher, trained_heads
from cskd.models import DenseTeacher, create_student, fuse_heads
from cskd.models.factory import create_timm_model
from cskd.models.pretrained import InitReport, build_initialised
from cskd.models.student import HEADS

if TYPE_CHECKING:
    from cskd.config import Config
    from cskd.data.datasets import DatasetInfo

TeacherOutputs = Tuple[torch.Tensor, torch.Tensor]  # (dense [N,K,H,W], global [N,K])


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


class Task:
    """The interface; see :class:`StudentTask` and :class:`TeacherTask`."""

    name: ClassVar[str]
    heads: ClassVar[Tuple[str, ...]]  # evaluation heads, reported per epoch and by `cskd eval`
    primary_head: ClassVar[str]  # the head that picks the best checkpoint

    def img_size(self, cfg: "Config") -> int:
        raise NotImplementedError

    def drop_path(self, cfg: "Config") -> float:
        """The stochastic-depth rate this task's network trains with."""
        raise NotImplementedError

    def spec(self, cfg: "Config", info: "DatasetInfo") -> ModelSpec:
        raise NotImplementedError

    def build(self, spec: ModelSpec, drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
        """A freshly initialised trainable network of ``spec`` (``timm_kwargs``: e.g. pretrained loading)."""
        raise NotImplementedError

    def network(self, model: nn.Module) -> nn.Module:
        """The timm model inside what :meth:`build` returns."""
        return model

    def init(self, cfg: "Config") -> Optional[str]:
        """The pretrained weights this task starts from (``student.init`` / ``teacher.init``), if any."""
        return None

    def create(self, spec: ModelSpec, drop_path_rate: float, init: Optional[str]) -> Tuple[nn.Module, Optional[InitReport]]:
        """:meth:`build`, started from the weights ``init`` names when set (and what that loading did)."""
        if not init:
            return self.build(spec, drop_path_rate), None
        return build_initialised(lambda kwargs: self.build(spec, drop_path_rate, **kwargs), self.network, init, self.name,
                                 spec.num_classes, spec.img_size, distilled=self.name == "student", class_names=spec.class_names)

    def distils(self, cfg: "Config") -> bool:
        return False

    def criterion(self, cfg: "Config", base: Callable) -> Callable:
        return base

    def loss_parts(self, model: nn.Module, criterion: Callable, images: torch.Tensor, targets: torch.Tensor,
                   teacher_out: Optional[TeacherOutputs], progress: float) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def head_logits(self, model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def weights(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The state dict to save, with plain timm keys (it also loads into ``timm.create_model``)."""
        raise NotImplementedError

    def load(self, spec: ModelSpec, tensors: Dict[str, torch.Tensor], path: Path) -> nn.Module:
        """The trained network of ``spec`` with ``tensors`` loaded, in eval mode."""
        raise NotImplementedError

    def deployable(self, model: nn.Module) -> nn.Module:
        """The eval-mode module that gets exported: input -> one logits tensor."""
        raise NotImplementedError

    def inference_heads(self, spec: ModelSpec) -> Tuple[str, ...]:
        """The heads the deployed prediction averages (fused into one); empty when nothing is fused."""
        return ()


class StudentTask(Task):
    """A DeiT with a distillation token, trained by CSKD (or its DeiT / supervised baselines)."""

    name = "student"
    heads = ("cls", "dist", "dense", "fused")
    primary_head = "fused"

    def img_size(self, cfg: "Config") -> int:
        return cfg.student.img_size

    def drop_path(self, cfg: "Config") -> float:
        return cfg.student.drop_path

    def spec(self, cfg: "Config", info: "DatasetInfo") -> ModelSpec:
        s, loss = cfg.student, cfg.loss
        return ModelSpec("student", s.model, info.num_classes, info.channels, s.img_size, s.patch_size, dict(s.kwargs),
                         tuple(s.mean or info.mean), tuple(s.std or info.std), info.class_names,
                         list(trained_heads(loss.alpha, loss.deit_type, loss.cskd_type, loss.cskd_weight)))

    def build(self, spec: ModelSpec, drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
        return create_student(spec.model, spec.num_classes, spec.img_size, spec.patch_size, spec.in_chans,
                              heads=spec.heads or HEADS, drop_path_rate=drop_path_rate, **spec.kwargs, **timm_kwargs)

    def network(self, model: nn.Module) -> nn.Module:
        return unwrap(model).vit

    def init(self, cfg: "Config") -> Optional[str]:
        return cfg.student.init

    def distils(self, cfg: "Config") -> bool:
        return needs_teacher(cfg.loss.deit_type, cfg.loss.cskd_type)

    def criterion(self, cfg: "Config", base: Callable) -> Callable:
        loss = cfg.loss
        return CSKDLoss(base, loss.alpha, loss.deit_type, loss.cskd_type, loss.cskd_weight, loss.decay, loss.tau)

    def loss_parts(self, model, criterion, images, targets, teacher_out, progress):
        outputs = tuple(o.float() for o in model(images))
        return criterion(outputs, targets, teacher_out, progress)

    def head_logits(self, model, images):
        model = unwrap(model)
        out = model.forward_heads(images)
        return {"cls": out.cls, "dist": out.dist, "dense": out.head("dense"), "fused": out.fused(model.heads)}

    def weights(self, model):
        return unwrap(model).vit.state_dict()

    def load(self, spec, tensors, path):
        model = self.build(spec)
        load_strict(model.vit, tensors, path, spec.model)
        return model.eval()

    def deployable(self, model):
        return fuse_heads(unwrap(model))

    def inference_heads(self, spec):
        return tuple(spec.heads) or HEADS


class TeacherTask(Task):
    """Supervised training of a timm CNN, to distil from later."""

    name = "teacher"
    heads = ("global", "dense")
    primary_head = "global"

    def img_size(self, cfg: "Config") -> int:
        return cfg.teacher.img_size or cfg.student.img_size

    def drop_path(self, cfg: "Config") -> float:
        return cfg.teacher.drop_path

    def spec(self, cfg: "Config", info: "DatasetInfo") -> ModelSpec:
        t = cfg.teacher
        return ModelSpec("teacher", t.model, info.num_classes, info.channels, self.img_size(cfg), None, dict(t.kwargs),
                         tuple(t.mean or info.mean), tuple(t.std or info.std), info.class_names)

    def build(self, spec: ModelSpec, drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
        kwargs = {**spec.kwargs, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}), **timm_kwargs}
        return create_timm_model(spec.model, "teacher", num_classes=spec.num_classes, in_chans=spec.in_chans, **kwargs)

    def init(self, cfg: "Config") -> Optional[str]:
        return cfg.teacher.init

    def loss_parts(self, model, criterion, images, targets, teacher_out, progress):
        return {"loss": criterion(model(images).float(), targets)}

    def head_logits(self, model, images):
        dense, global_logits = DenseTeacher(unwrap(model))(images)
        return {"global": global_logits, "dense": dense.mean(dim=(2, 3))}

    def weights(self, model):
        return unwrap(model).state_dict()

    def load(self, spec, tensors, path):
        model = self.build(spec)
        load_strict(model, tensors, path, spec.model)
        return model.eval()

    def deployable(self, model):
        return unwrap(model).eval()  # the bare CNN: global logits only


TASKS: Dict[str, Task] = {task.name: task for task in (StudentTask(), TeacherTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise CSKDError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Trained:
    """A network rebuilt from a cskd checkpoint, with the task that knows how to use it."""

    model: nn.Module
    spec: ModelSpec
    info: Dict[str, Any]
    task: Task
    path: Path

    def head_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.task.head_logits(self.model, images)

    def deployable(self) -> nn.Module:
        return self.task.deployable(self.model)

    @property
    def heads(self) -> Tuple[str, ...]:
        return self.task.inference_heads(self.spec)


def load_trained(checkpoint: str | Path) -> Trained:
    """Rebuild the network stored in a cskd checkpoint (or a run directory's best), in eval mode."""
    path = resolve_checkpoint(checkpoint)
    tensors, spec, info = load_weights(path)
    task = get_task(spec.role)
    return Trained(task.load(spec, tensors, path), spec, info, task, path)
