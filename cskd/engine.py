"""One training epoch and one evaluation pass; both return dicts of averaged metrics."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn

from cskd.data.transfer import UNLABELED
from cskd.data.transforms import normalize
from cskd.distributed import DistEnv, all_reduce_sum
from cskd.errors import CSKDError
from cskd.loss import ckf_ratio, training_progress
from cskd.progress import Progress

AMP_MODES = ("auto", "bf16", "fp16", "off")


def amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.amp``: ``auto`` is bf16 on CUDA and full precision elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


class DivergedError(CSKDError):
    """The loss became NaN or infinite."""


@dataclass
class Normalization:
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class TeacherTargets(Protocol):
    """The teacher's ``(dense [N,K,H,W], global [N,K])`` logits for a batch of augmented images;
    ``batch`` holds each image's index and crop geometry and how the batch was mixed."""

    def __call__(self, images: torch.Tensor, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        ...


@dataclass
class StepContext:
    """What one optimisation step needs besides the batch."""

    task: object  # cskd.tasks.Task: how to score a batch
    model: nn.Module  # what the task trains, maybe DDP- or compile-wrapped
    teacher: Optional[TeacherTargets]  # None without distillation
    criterion: Callable  # CSKDLoss for students; (logits, targets) -> loss for teachers
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per update
    model_norm: Normalization  # the trained network's input normalisation
    env: DistEnv
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    mixup: Optional[Callable] = None
    ema: Optional[object] = None
    clip_grad: Optional[float] = None
    decay: str = "linear"
    ckf_progress: str = "step"  # "step" (continuous) or "epoch" (the official code's whole epochs)


def _loss_parts(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor, batch: Dict[str, torch.Tensor],
                progress: float) -> Dict[str, torch.Tensor]:
    with autocast(ctx.env.device, ctx.amp_dtype):
        teacher_out = ctx.teacher(images, batch) if ctx.teacher is not None else None
        return ctx.task.loss_parts(ctx.model, ctx.criterion, ctx.model_norm(images), targets, teacher_out, progress)


def train_one_epoch(
    ctx: StepContext,
    loader: Iterable,
    epoch: int,
    steps_per_epoch: int,
    total_steps: int,
    progress_bar: Optional[Progress] = None,
) -> Dict[str, float]:
    """Train for one epoch; returns the mean of each loss part, the last lr, CKF ratio and images/s."""
    ctx.model.train()
    sums: Dict[str, torch.Tensor] = {}
    seen, start = 0, time.perf_counter()
    step = epoch * steps_per_epoch
    for i, (images, targets, batch) in enumerate(loader):
        # Transfer-set images (no label) follow the labelled ones: the loss's labels cover the first rows only.
        batch["labelled"] = labelled = int((targets != UNLABELED).sum())
        images = images.to(ctx.env.device, non_blocking=True)
        targets = targets[:labelled].to(ctx.env.device, non_blocking=True)
        if ctx.mixup is not None:  # mixes labelled images among themselves
            mixed, targets = ctx.mixup(images[:labelled], targets)
            images = mixed if labelled == len(images) else torch.cat([mixed, images[labelled:]])
            batch["mix"] = ctx.mixup.last  # cached teacher targets are mixed the same way
        progress = training_progress(step, steps_per_epoch, total_steps, ctx.ckf_progress)
        parts = _loss_parts(ctx, images, targets, batch, progress)
        loss = parts["loss"]
        step += 1
        _optimize(ctx, loss, step)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(images)
        seen += len(images)
        if progress_bar is not None and (i % 10 == 0 or i == steps_per_epoch - 1):
            current = float(loss.detach())  # syncs the device; only every few steps
            _check_finite(current, epoch, i)
            rate = seen * ctx.env.world_size / (time.perf_counter() - start)
            progress_bar.set_postfix(loss=f"{current:.3f}", lr=f"{current_lr(ctx.optimizer):.2e}", img_s=f"{rate:.0f}")
        if progress_bar is not None:
            progress_bar.update(1)
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[n] for n in names] + [torch.tensor(float(seen), device=ctx.env.device)]), ctx.env)
    metrics = {f"loss_{n}" if n != "loss" else "loss": float(totals[j] / totals[-1]) for j, n in enumerate(names)}
    _check_finite(metrics["loss"], epoch, steps_per_epoch - 1)
    metrics["lr"] = current_lr(ctx.optimizer)
    # step counting: the ratio the epoch ends at; epoch counting: the one it used throughout
    end = training_progress(step - 1, steps_per_epoch, total_steps, "epoch") if ctx.ckf_progress == "epoch" else step / total_steps
    metrics["ckf_ratio"] = ckf_ratio(end, ctx.decay)
    metrics["images_per_s"] = float(totals[-1]) / elapsed
    return metrics


def _optimize(ctx: StepContext, loss: torch.Tensor, step: int) -> None:
    """Backward, (unscale and) clip, optimizer and scheduler step, EMA update."""
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(ctx.optimizer)
    else:
        loss.backward()
    if ctx.clip_grad:
        nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.clip_grad)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step_update(num_updates=step)
    if ctx.ema is not None:
        ctx.ema.update(ctx.model.module if hasattr(ctx.model, "module") else ctx.model, step=step)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's rate: the largest group's (with layer-wise decay the lower layers run at a fraction of it)."""
    return max(group["lr"] for group in optimizer.param_groups)


def _check_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise DivergedError(
            f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1}; the last good "
            "checkpoint is kept; lower train.lr or set train.clip_grad=1.0 and resume"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    head_logits: Callable[[nn.Module, torch.Tensor], Dict[str, torch.Tensor]],
    loader: Iterable,
    norm: Normalization,
    env: DistEnv,
    amp_dtype: Optional[torch.dtype] = None,
    progress_bar: Optional[Progress] = None,
) -> Dict[str, Dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of every head ``head_logits(model, images)`` gives,
    summed over all processes."""
    model.eval()
    correct: Dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=env.device)
    for images, targets, *_ in loader:
        images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        with autocast(env.device, amp_dtype):
            logits = head_logits(model, norm(images))
        for head, z in logits.items():
            k = min(5, z.shape[1])
            top = z.float().topk(k, dim=1).indices
            hits = top.eq(targets[:, None])
            pair = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
            correct[head] = correct.get(head, 0) + pair
        count += len(targets)
        if progress_bar is not None:
            progress_bar.update(1)
    heads = list(correct)
    totals = all_reduce_sum(torch.stack([correct[h] for h in heads] + [count.expand(2)]), env)
    n = float(totals[-1][0])
    return {
        "top1": {h: 100.0 * float(totals[j][0]) / n for j, h in enumerate(heads)},
        "top5": {h: 100.0 * float(totals[j][1]) / n for j, h in enumerate(heads)},
        "count": int(n),
    }
