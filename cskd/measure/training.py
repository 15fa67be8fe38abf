"""What a training step costs on this machine: images/s of the real step on synthetic batches.

The step is :func:`cskd.engine.train_one_epoch`'s, with the run's loss, optimiser, mixing and
teacher targets; only the data is made up. Cached teacher targets come from a real memory-mapped
cache of random maps of the teacher's grid (:func:`random_cache`, laid out as ``cskd cache-teacher``
writes it), read through :class:`~cskd.teachers.CachedTeacher`, so the crop, flip and mix of the
maps cost what they cost in training. Data loading is not timed: the figure is the step alone.
``cskd plan`` and ``benchmarks/train_throughput.py`` measure with these pieces.

What a run's time is made of is another figure (:func:`epoch_cost`): real steps from the run's own
data loader (loading, augmentation and the cached teacher's maps included) and a validation pass, the
two parts of every epoch; ``cskd plan`` gives its proxies equal time from it (:class:`EpochCost`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.optim import create_optimizer_v2

from cskd.checkpoint import ModelSpec
from cskd.config import Config
from cskd.data.mixing import build_mixup
from cskd.distributed import DistEnv
from cskd.engine import Normalization, StepContext, amp_dtype, evaluate, train_one_epoch
from cskd.tasks import get_task
from cskd.teacher_cache import CacheManifest, TeacherCache, shard_paths
from cskd.teachers import CachedTeacher
from cskd.train import Loaders, build_base_criterion, scaled_lr

Batch = Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]


class NoSchedule:
    """The step's scheduler call, doing nothing: a learning-rate schedule costs nothing measurable."""

    def step_update(self, num_updates: int) -> None:
        pass


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it has seen the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_cache(folder: Path, count: int, classes: int, grid: Tuple[int, int], topk: Optional[int]) -> TeacherCache:
    """A complete cache of ``count`` random maps, laid out as ``cskd cache-teacher`` writes it."""
    manifest = CacheManifest(teacher={"sha256": "random", "model": "random"}, data={"count": count, "fingerprint": "random"},
                             image_size=0, grid=grid, num_classes=classes, topk=topk, shard_size=count, complete=True)
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width = topk or classes
    np.save(shard_paths(folder, 0)[0], rng.standard_normal((count, width, *grid)).astype(np.float16))
    if topk:
        np.save(shard_paths(folder, 0)[1], rng.integers(0, classes, (count, topk, *grid)).astype(np.int16))
    manifest.write(folder)
    return TeacherCache(folder)


def synthetic_batches(batch: int, steps: int, channels: int, img_size: int, num_classes: int, count: int,
                      device: torch.device) -> List[Batch]:
    """``steps`` batches of random images in [0, 1] with labels and what the data loader records per
    image (cache index among ``count``, crop box, flip), as :func:`~cskd.engine.train_one_epoch` takes them."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        low = torch.rand(batch, 2, generator=generator) * 0.3
        meta = {"index": torch.randint(0, count, (batch,), generator=generator),
                "box": torch.cat([low, low + 0.7], dim=1), "flip": torch.rand(batch, generator=generator) < 0.5}
        images = torch.rand((batch, channels, img_size, img_size), generator=generator).to(device)
        batches.append((images, torch.randint(0, num_classes, (batch,), generator=generator).to(device), meta))
    return batches


def images_per_second(ctx: StepContext, batches: List[Batch]) -> float:
    """Training images per second over ``batches``, one optimiser step each."""
    synchronize(ctx.env.device)
    start = time.perf_counter()
    train_one_epoch(ctx, batches, 0, len(batches), len(batches))
    synchronize(ctx.env.device)
    return sum(len(images) for images, _, _ in batches) / (time.perf_counter() - start)


def step_context(cfg: Config, spec: ModelSpec, cache: Optional[TeacherCache], device: torch.device) -> StepContext:
    """The training step of ``cfg`` for a fresh network of ``spec``: its task's loss, its optimiser
    (rate as the run scales it), mixing and precision, with targets read from ``cache`` (None: no distillation)."""
    task = get_task(cfg.train.target)
    teacher = CachedTeacher(cache) if cache is not None else None
    torch.manual_seed(cfg.train.seed)
    model = task.build(spec, task.drop_path(cfg)).to(device)
    mixup = build_mixup(cfg.data, cfg.train.batch_size, spec.num_classes)
    optimizer = create_optimizer_v2(model, opt=cfg.train.opt, lr=scaled_lr(cfg, 1), weight_decay=cfg.train.weight_decay,
                                    layer_decay=cfg.train.layer_decay)
    return StepContext(task, model, teacher, task.criterion(cfg, build_base_criterion(cfg, mixup is not None)), optimizer,
                       NoSchedule(), Normalization(spec.mean, spec.std), DistEnv(0, 1, 0, device),
                       amp_dtype=amp_dtype(cfg.train.amp, device), mixup=mixup, clip_grad=cfg.train.clip_grad,
                       decay=cfg.loss.decay, ckf_progress=cfg.loss.ckf_progress)


def training_rates(contexts: Sequence[StepContext], batches: List[Batch], rounds: int = 3, warmup: int = 3) -> List[List[float]]:
    """Images/s of each context's step over ``batches``, per round: ``warmup`` steps each first
    (allocator, kernels), then ``rounds`` rounds with the contexts interleaved round by round, so that
    drift of a busy machine hits all alike (as ``cskd bench`` interleaves the models it times)."""
    for ctx in contexts:
        train_one_epoch(ctx, batches[:warmup], 0, warmup, warmup)
    rates: List[List[float]] = [[] for _ in contexts]
    for _ in range(rounds):
        for ctx, own in zip(contexts, rates):
            own.append(images_per_second(ctx, batches))
    return rates


@dataclass(frozen=True)
class EpochCost:
    """What a run of one network costs here, in its two parts: optimiser steps and the validation pass
    that ends every epoch (a last epoch cut short by ``train.max_steps`` too)."""

    step_s: float  # one optimiser step on the real data, its loading included (steady state)
    val_s: float  # one validation pass
    steps_per_epoch: int

    @property
    def epoch_s(self) -> float:
        return self.steps_per_epoch * self.step_s + self.val_s

    def seconds(self, steps: int) -> float:
        """The wall time of a run of ``steps`` optimiser steps (its start left out)."""
        return steps * self.step_s + math.ceil(steps / self.steps_per_epoch) * self.val_s

    def steps_in(self, seconds: float) -> int:
        """The optimiser steps a run takes in ``seconds`` (at least one): whole epochs, then the steps of a
        cut-short last one once its validation pass is paid for (none when less than that is left)."""
        full = int(seconds // self.epoch_s)
        rest = seconds - full * self.epoch_s - self.val_s
        return max(1, full * self.steps_per_epoch + (max(0, round(rest / self.step_s)) if rest > 0 else 0))


def epoch_cost(ctx: StepContext, loaders: Loaders, steps: int, warmup: int = 3) -> EpochCost:
    """Seconds per optimiser step of ``ctx`` on the run's own training batches (``steps`` of them after
    ``warmup``, from one pass of the loader, so its workers are running: loading, augmentation and the
    teacher's maps included), and of one validation pass over the run's validation loader."""
    per_epoch = len(loaders.train)
    warmup = min(warmup, per_epoch - 1)
    steps = min(steps, per_epoch - warmup)
    batches = iter(loaders.train)
    if warmup:
        train_one_epoch(ctx, itertools.islice(batches, warmup), 0, per_epoch, per_epoch)
    synchronize(ctx.env.device)
    start = time.perf_counter()
    train_one_epoch(ctx, itertools.islice(batches, steps), 0, per_epoch, per_epoch)
    synchronize(ctx.env.device)
    step_s = (time.perf_counter() - start) / steps
    del batches  # its workers stop
    start = time.perf_counter()
    evaluate(ctx.model, ctx.task.head_logits, loaders.val, ctx.model_norm, ctx.env, ctx.amp_dtype)
    synchronize(ctx.env.device)
    return EpochCost(step_s, time.perf_counter() - start, per_epoch)
