"""``cskd train``: build the run from a :class:`~cskd.config.Config` and train it.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` / ``best.safetensors`` (deployable weights with their spec), ``last.state.pt``
(everything ``--resume`` needs) and ``curves.png``. Each epoch reseeds every random generator from
``(train.seed, epoch)``, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cskd.checkpoint import (
    BEST,
    FORMAT,
    LAST,
    ModelSpec,
    load_state,
    read_safetensors,
    save_state,
    save_weights,
)
from cskd.config import Config, save_config
from cskd.data.datasets import DatasetInfo, build_dataset
from cskd.data.transforms import eval_transform, train_transform
from cskd.distributed import DistEnv, barrier, init_distributed, shutdown
from cskd.engine import Normalization, StepContext, evaluate, train_one_epoch
from cskd.errors import CSKDError
from cskd.loss import CSKDLoss

STATE = "last.state.pt"
DEMO_TEACHER = "demo"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch


def amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def demo_teacher_path() -> Path:
    return Path(str(resources.files("cskd") / "assets" / "teacher_fashion_mnist_demo.safetensors"))


def resolve_teacher_checkpoint(value: str) -> Path:
    return demo_teacher_path() if value == DEMO_TEACHER else Path(value)


# ---------------------------------------------------------------------------------------------
# Building the pieces


def build_loaders(cfg: Config, env: DistEnv, img_size: int) -> Tuple[DataLoader, DataLoader, DatasetInfo]:
    _, info = build_dataset(cfg.data.name, "val", cfg.data.path, cfg.data.channels)
    d = cfg.data
    train_tf = train_transform(img_size, info.channels, d.auto_augment, d.scale, d.hflip, d.reprob, d.interpolation,
                               d.color_jitter)
    train_set, _ = build_dataset(d.name, "train", d.path, d.channels, train_tf)
    val_set, _ = build_dataset(d.name, "val", d.path, d.channels, eval_transform(img_size, info.channels, d.interpolation))
    train_set, val_set = _limit(train_set, d.max_train), _limit(val_set, d.max_val)
    global_batch = cfg.train.batch_size * env.world_size
    if len(train_set) < global_batch:
        raise CSKDError(
            f"the training split has {len(train_set)} images, fewer than one global batch ({global_batch}); lower train.batch_size"
        )
    # The same sampler with one replica in single-process runs: the order then depends only on the
    # seed and the epoch, and a 2-process run sees the same images per step as one process with 2x the batch.
    sampler = DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
    common = dict(num_workers=d.workers, pin_memory=env.device.type == "cuda", persistent_workers=False)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(_shard(val_set, env), batch_size=max(cfg.train.batch_size, 64), shuffle=False, **common)
    return train_loader, val_loader, info


def _limit(dataset: Dataset, count: Optional[int]) -> Dataset:
    """A fixed random subset (the same for every seed and process), or the whole set."""
    if count is None or count >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count].sort().values
    return torch.utils.data.Subset(dataset, keep.tolist())


def _shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every process evaluates a disjoint slice, so summed counts cover each image exactly once."""
    if not env.distributed:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))


def build_teacher(cfg: Config, info: DatasetInfo, device: torch.device) -> Tuple[nn.Module, Normalization, Dict[str, Any]]:
    from cskd.models import create_teacher

    path = resolve_teacher_checkpoint(cfg.teacher.checkpoint)
    spec = peek_spec(path)
    mean = tuple(cfg.teacher.mean or (spec.mean if spec else info.mean))
    std = tuple(cfg.teacher.std or (spec.std if spec else info.std))
    kwargs = {**(spec.kwargs if spec else {}), **cfg.teacher.kwargs}
    if spec is not None:
        _check_compatible(spec, info, path)
    teacher = create_teacher(cfg.teacher.model, info.num_classes, info.channels, checkpoint=path, **kwargs)
    return teacher.to(device), Normalization(mean, std), kwargs


def peek_spec(path: Path) -> Optional[ModelSpec]:
    """The spec of a cskd checkpoint, or None for a plain state dict."""
    from cskd.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(path)
    if path.suffix != ".safetensors":
        return None
    metadata = read_safetensors(path)[1]
    return ModelSpec.from_metadata(metadata, path) if metadata.get("format") == FORMAT else None


def _check_compatible(spec: ModelSpec, info: DatasetInfo, path: Path) -> None:
    if spec.num_classes != info.num_classes:
        raise CSKDError(
            f"teacher {path} predicts {spec.num_classes} classes but the data has {info.num_classes}; "
            "use a teacher trained on this data set"
        )
    if spec.in_chans != info.channels:
        raise CSKDError(
            f"teacher {path} takes {spec.in_chans}-channel images but the data has {info.channels}; "
            "set data.channels to match or retrain the teacher"
        )


def build_model(cfg: Config, info: DatasetInfo) -> Tuple[nn.Module, ModelSpec]:
    """The network this run trains: the distilled student, or the CNN when training a teacher."""
    from cskd.models import create_student
    from cskd.models.factory import create_timm_model

    if cfg.train.target == "teacher":
        t = cfg.teacher
        size = t.img_size or cfg.student.img_size
        model = create_timm_model(
            t.model, "teacher", num_classes=info.num_classes, in_chans=info.channels, drop_path_rate=t.drop_path, **t.kwargs
        )
        spec = ModelSpec("teacher", t.model, info.num_classes, info.channels, size, None, dict(t.kwargs),
                         tuple(t.mean or info.mean), tuple(t.std or info.std), info.class_names)
        return model, spec
    s = cfg.student
    model = create_student(
        s.model, info.num_classes, s.img_size, s.patch_size, info.channels, drop_path_rate=s.drop_path, **s.kwargs
    )
    spec = ModelSpec("student", s.model, info.num_classes, info.channels, s.img_size, s.patch_size, dict(s.kwargs),
                     tuple(s.mean or info.mean), tuple(s.std or info.std), info.class_names)
    return model, spec


def build_criterion(cfg: Config, mixup_on: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_on:
        base = SoftTargetCrossEntropy()  # mixup already smooths the labels
    elif cfg.data.smoothing > 0:
        base = LabelSmoothingCrossEntropy(cfg.data.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    if cfg.train.target == "teacher":
        return base
    loss = cfg.loss
    return CSKDLoss(base, loss.alpha, loss.deit_type, loss.cskd_type, loss.cskd_weight, loss.decay, loss.tau)


def build_mixup(cfg: Config, num_classes: int):
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    if cfg.train.batch_size % 2:
        raise CSKDError(f"mixup/cutmix needs an even train.batch_size, got {cfg.train.batch_size}")
    from timm.data import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob, switch_prob=d.mixup_switch_prob,
                 label_smoothing=d.smoothing, num_classes=num_classes)


def scaled_lr(cfg: Config, world_size: int) -> float:
    """DeiT's linear scaling: ``train.lr`` is the rate for a global batch of 512."""
    return cfg.train.lr * cfg.train.batch_size * world_size / 512


# ---------------------------------------------------------------------------------------------
# The run directory


def default_output(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.train.target}-{datetime.now():%Y%m%d-%H%M%S}")


def prepare_run_dir(cfg: Config, resume: bool, create: bool = True) -> Path:
    run = Path(cfg.output)
    if not resume and (run / STATE).exists():
        raise CSKDError(
            f"{run} already holds a run; continue it with `cskd train --resume {run}` or set output=ANOTHER_DIR"
        )
    if resume and not (run / STATE).exists():
        raise CSKDError(f"{run} has no {STATE} to resume from (the run never finished an epoch); start it anew")
    if not create:
        return run
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CSKDError(f"cannot write to output folder {run} ({exc.strerror}); set output=A_WRITABLE_DIR") from None
    return run


def append_metrics(run: Path, record: Dict[str, Any]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run: Path, up_to_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """The rows of metrics.jsonl, optionally only those of epochs 1..up_to_epoch."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def truncate_metrics(run: Path, completed_epochs: int) -> None:
    """Drop lines of epochs after the resumed checkpoint (a crash may have logged them)."""
    rows = read_metrics(run, completed_epochs)
    from cskd.checkpoint import atomic_write

    atomic_write(run / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunResult:
    run_dir: Path
    best_top1: float
    best_epoch: int
    final: Dict[str, Any]
    wall_s: float


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _weights_of(model: nn.Module, target: str) -> Dict[str, torch.Tensor]:
    """Plain timm state-dict keys, so checkpoints also load into ``timm.create_model``."""
    model = _unwrap(model)
    return (model.vit if target == "student" else model).state_dict()


def _eval_view(model: nn.Module, target: str) -> nn.Module:
    """The wrapper ``evaluate`` understands: student as is, a bare CNN wrapped as a DenseTeacher."""
    from cskd.models import DenseTeacher

    model = _unwrap(model)
    return model if target == "student" else DenseTeacher(model)


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train according to ``cfg``; with ``resume`` continue the run in ``cfg.output``."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from tqdm import tqdm

    started = time.perf_counter()
    env = init_distributed(cfg.train.device)
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.output is None:
            cfg.output = default_output(cfg)
        run = prepare_run_dir(cfg, resume, create=env.is_main)  # every rank checks, so all fail alike
        barrier(env)
        seed_everything(cfg.train.seed)
        img_size = (cfg.teacher.img_size or cfg.student.img_size) if cfg.train.target == "teacher" else cfg.student.img_size
        train_loader, val_loader, info = build_loaders(cfg, env, img_size)
        model, spec = build_model(cfg, info)
        model.to(env.device)
        teacher, teacher_norm = None, None
        distil = cfg.train.target == "student" and (cfg.loss.deit_type != "none" or cfg.loss.cskd_type != "none")
        if distil:
            teacher, teacher_norm, kwargs = build_teacher(cfg, info, env.device)
            cfg.teacher.kwargs = kwargs
        mixup = build_mixup(cfg, info.num_classes)
        criterion = build_criterion(cfg, mixup is not None)
        optimizer = create_optimizer_v2(model, opt=cfg.train.opt, lr=scaled_lr(cfg, env.world_size), weight_decay=cfg.train.weight_decay)
        steps_per_epoch = len(train_loader)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=cfg.train.epochs, warmup_epochs=cfg.train.warmup_epochs,
            min_lr=cfg.train.min_lr, warmup_lr=cfg.train.warmup_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
        )
        dtype = amp_dtype(cfg.train.amp, env.device)
        scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
        ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
        start_epoch, best_top1, best_epoch = 0, -1.0, -1
        if resume:
            state = load_state(run / STATE)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            start_epoch, best_top1, best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
            if env.is_main:
                truncate_metrics(run, state["epoch"] + 1)
        if env.is_main:
            save_config(cfg, run / "config.yaml")
        train_model: nn.Module = model
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        if env.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        ctx = StepContext(
            model=train_model, teacher=teacher, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
            student_norm=Normalization(spec.mean, spec.std), teacher_norm=teacher_norm, env=env, amp_dtype=dtype,
            scaler=scaler, mixup=mixup, ema=ema, clip_grad=cfg.train.clip_grad, decay=cfg.loss.decay,
        )
        total_steps = cfg.train.epochs * steps_per_epoch
        if env.is_main:
            _announce(cfg, env, spec, info, run, len(train_loader.dataset), steps_per_epoch, resume, start_epoch)
        metrics: Dict[str, Any] = {}
        for epoch in range(start_epoch, cfg.train.epochs):
            seed_everything(epoch_seed(cfg.train.seed, epoch) + env.rank)
            train_loader.sampler.set_epoch(epoch)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                       leave=False, dynamic_ncols=True, disable=not (show_progress and env.is_main))
            with bar:
                train_metrics = train_one_epoch(ctx, train_loader, epoch, steps_per_epoch, total_steps, bar)
            eval_model = _eval_view(ema.module if ema is not None else model, cfg.train.target)
            val = evaluate(eval_model, val_loader, ctx.student_norm, env, dtype)
            head = "fused" if cfg.train.target == "student" else "global"
            top1 = val["top1"][head]
            is_best = top1 > best_top1
            if is_best:
                best_top1, best_epoch = top1, epoch
            metrics = {"epoch": epoch + 1, **train_metrics,
                       **{f"val_top1_{h}": v for h, v in val["top1"].items()},
                       **{f"val_top5_{h}": v for h, v in val["top5"].items()},
                       "time_s": round(time.perf_counter() - started, 2)}
            if env.is_main:
                _save_epoch(run, model, ema, optimizer, scheduler, scaler, spec, cfg.train.target, epoch, best_top1, best_epoch, is_best, top1)
                append_metrics(run, metrics)
                _print_epoch(metrics, head, is_best)
            barrier(env)
        if env.is_main:
            _write_plots(run)
        wall = time.perf_counter() - started
        result = RunResult(run, best_top1, best_epoch + 1, metrics, wall)
        if env.is_main:
            _summary(result, cfg)
        return result
    finally:
        shutdown(env)


def _save_epoch(run, model, ema, optimizer, scheduler, scaler, spec, target, epoch, best_top1, best_epoch, is_best, top1) -> None:
    deployable = ema.module if ema is not None else model
    info = {"epoch": epoch + 1, "val_top1": top1}
    # State first: a crash between the two writes leaves last.safetensors one epoch behind, never ahead.
    save_state(run / STATE, {
        "epoch": epoch, "best_top1": best_top1, "best_epoch": best_epoch,
        "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "ema": ema.state_dict() if ema is not None else None,
    })
    save_weights(run / LAST, _weights_of(deployable, target), spec, info)
    if is_best:
        save_weights(run / BEST, _weights_of(deployable, target), spec, info)


def _announce(cfg, env, spec, info, run, n_train, steps, resume, start_epoch) -> None:
    what = "teacher" if cfg.train.target == "teacher" else "student"
    kd = "supervised" if cfg.train.target == "teacher" else (
        f"deit={cfg.loss.deit_type} cskd={cfg.loss.cskd_type} decay={cfg.loss.decay}")
    print(f"cskd train: {what} {spec.model} ({kd}) on {cfg.data.name} [{n_train} images, {info.num_classes} classes]")
    print(f"  device {env.device} x{env.world_size}, {steps} steps/epoch, lr {scaled_lr(cfg, env.world_size):.2e}, run dir {run}"
          + (f", resuming at epoch {start_epoch + 1}" if resume else ""))


def _print_epoch(metrics: Dict[str, Any], head: str, is_best: bool) -> None:
    parts = [f"epoch {metrics['epoch']:>3}", f"loss {metrics['loss']:.4f}", f"val top-1 {metrics[f'val_top1_{head}']:.2f}%"]
    if "val_top1_cls" in metrics:
        parts.append("(cls {val_top1_cls:.1f} / dist {val_top1_dist:.1f} / dense {val_top1_dense:.1f})".format(**metrics))
    parts += [f"{metrics['images_per_s']:.0f} img/s", f"ckf r {metrics['ckf_ratio']:.2f}" if "loss_cskd" in metrics else ""]
    print("  " + "  ".join(p for p in parts if p) + ("  *best" if is_best else ""), flush=True)


def _write_plots(run: Path) -> None:
    from cskd.plots import plot_curves

    rows = read_metrics(run)
    if rows:
        plot_curves(rows, run / "curves.png")


def _summary(result: RunResult, cfg: Config) -> None:
    minutes, seconds = divmod(int(round(result.wall_s)), 60)
    head = "fused" if cfg.train.target == "student" else "global"
    print(f"done in {minutes}m{seconds:02d}s: best val top-1 ({head}) {result.best_top1:.2f}% at epoch {result.best_epoch}")
    print(f"  weights {result.run_dir / BEST}, curves {result.run_dir / 'curves.png'}")
    print(f"  next: cskd eval {result.run_dir}")
