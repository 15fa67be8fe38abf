"""``cskd train``: build a run from a :class:`~cskd.config.Config`, then loop over its epochs.

What a run writes is described in :mod:`cskd.run`. Each epoch reseeds every random generator from
``(train.seed, epoch)``, so a resumed run continues exactly as an uninterrupted one would.
Everything only the main process does (printing, writing the run directory) lives in
:class:`MainProcess`; other ranks get :class:`Quiet`.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from cskd import guard, pairing
from cskd.checkpoint import ModelSpec, load_state, save_state, save_weights
from cskd.config import Config
from cskd.data.datasets import DatasetInfo, build_dataset
from cskd.data.mixing import build_mixup
from cskd.data.samples import Indexed, limit
from cskd.data.transfer import MixedBatchSampler, left_out_line, training_images
from cskd.data.transforms import train_transform
from cskd.data.validation import TeacherAccuracy, validation_set
from cskd.distributed import DistEnv, barrier, init_distributed, shard, shutdown
from cskd.engine import Normalization, StepContext, amp_dtype, current_lr, evaluate, train_one_epoch
from cskd.errors import CSKDError
from cskd.models.pretrained import InitReport
from cskd.plots import plot_curves
from cskd.progress import progress
from cskd.run import RunDir
from cskd.tasks import Task, get_task, unwrap
from cskd.teachers import build_teacher_targets, run_teacher_accuracy, teacher_network


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch


def scaled_lr(cfg: Config, world_size: int) -> float:
    """DeiT's linear scaling: ``train.lr`` is the rate for a global batch of 512."""
    return cfg.train.lr * cfg.train.batch_size * world_size / 512


# ---------------------------------------------------------------------------------------------
# Building the pieces


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    info: DatasetInfo
    train_split: Dataset  # what a teacher cache covers: the whole training split, then the transfer set
    epochs: Any  # what set_epoch is called on: the training sampler, or the mixed batch sampler
    labelled_images: int
    transfer_images: int = 0
    transfer_batch: int = 0  # transfer images per step
    left_out: str = ""  # what the transfer set left out (images equal to labelled or validation ones), as a line


def build_loaders(cfg: Config, env: DistEnv, img_size: int) -> Loaders:
    d = cfg.data
    val_split, info = build_dataset(d.name, "val", d.path, d.channels)
    train_tf = train_transform(img_size, info.channels, d.auto_augment, d.scale, d.hflip, d.reprob, d.interpolation,
                               d.color_jitter, d.re_mode, d.invariance)
    train_split = build_dataset(d.name, "train", d.path, d.channels, train_tf)[0]
    cached = training_images(train_split, d.unlabeled, info.channels, train_tf, val_split)
    train_set = limit(Indexed(train_split), d.max_train)  # indices stay those of the whole split
    val_set = validation_set(d, img_size)
    global_batch = cfg.train.batch_size * env.world_size
    if len(train_set) < global_batch:
        raise CSKDError(
            f"the training split has {len(train_set)} images, fewer than one global batch ({global_batch}); lower train.batch_size"
        )
    sampler = train_sampler(train_set, cfg, env)
    common = dict(num_workers=d.workers, pin_memory=env.device.type == "cuda", persistent_workers=False)
    val_loader = DataLoader(shard(val_set, env), batch_size=max(cfg.train.batch_size, 64), shuffle=False, **common)
    if cached is train_split:
        train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, **common)
        return Loaders(train_loader, val_loader, info, train_split, sampler, len(train_set))
    transfer = cached.datasets[1]
    transfer_batch = round(d.unlabeled_ratio * cfg.train.batch_size)
    if transfer_batch < 1:
        raise CSKDError(f"data.unlabeled_ratio={d.unlabeled_ratio} x train.batch_size={cfg.train.batch_size} is less than one "
                        "transfer image per step; raise data.unlabeled_ratio")
    batches = MixedBatchSampler(sampler, cfg.train.batch_size, len(transfer), transfer_batch, len(train_set),
                                env.rank, env.world_size, cfg.train.seed)
    mixed = ConcatDataset([train_set, Indexed(transfer, offset=len(train_split))])  # cache rows follow the split's
    train_loader = DataLoader(mixed, batch_sampler=batches, **common)
    return Loaders(train_loader, val_loader, info, cached, batches, len(train_set), len(transfer), transfer_batch,
                   left_out_line(cached))


def train_sampler(train_set: Dataset, cfg: Config, env: DistEnv) -> Sampler:
    """DeiT's repeated augmentation (timm's RepeatAugSampler) when asked, else a DistributedSampler.

    A DistributedSampler with one replica in single-process runs too: the order then depends only on
    the seed and the epoch, and a 2-process run sees the same images per step as one process with
    twice the batch.
    """
    if cfg.data.repeated_aug > 1:
        return RepeatAugSampler(train_set, env.world_size, env.rank, shuffle=True, num_repeats=cfg.data.repeated_aug)
    return DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=cfg.train.seed, drop_last=True)


def build_base_criterion(cfg: Config, mixup_on: bool) -> Callable:
    if mixup_on:
        return SoftTargetCrossEntropy()  # mixup already smooths the labels
    if cfg.data.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.data.smoothing)
    return nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------
# The session: everything a run needs, built once; resumable state in one place


@dataclass
class Session:
    cfg: Config
    env: DistEnv
    run: RunDir
    task: Task
    spec: ModelSpec
    loaders: Loaders
    model: nn.Module  # the bare network (state, checkpoints)
    ctx: StepContext  # what the step uses (wrapped model, optimizer...)
    start_epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    resumed_schedule: Optional[Dict[str, int]] = None  # the schedule the resumed state was saved under
    init_report: Optional[InitReport] = None  # what starting from pretrained weights loaded
    teacher_accuracy: Optional[TeacherAccuracy] = None  # distilled runs: the teacher on the validation images

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders.train)

    @property
    def total_steps(self) -> int:
        """The optimiser steps the run takes: every step of ``train.epochs``, or ``train.max_steps`` if fewer."""
        return budget_steps(self.cfg, self.steps_per_epoch)

    @property
    def epochs(self) -> int:
        """The epochs that run: ``train.epochs``, fewer under ``train.max_steps`` (the last one maybe cut short)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def schedule(self) -> Dict[str, int]:
        """What the LR schedule and CKF progress are laid out by (saved with the state, compared on resume)."""
        cfg = self.cfg.train
        schedule = {"epochs": cfg.epochs, "steps_per_epoch": self.steps_per_epoch, "batch_size": cfg.batch_size,
                    "world_size": self.env.world_size, "train_images": self.loaders.labelled_images}
        if self.loaders.transfer_images:
            schedule.update(transfer_images=self.loaders.transfer_images, transfer_batch=self.loaders.transfer_batch)
        if cfg.max_steps is not None:
            schedule["max_steps"] = int(cfg.max_steps)
        return schedule

    @property
    def deployable_weights(self) -> Dict[str, torch.Tensor]:
        source = self.ctx.ema.module if self.ctx.ema is not None else self.model
        return self.task.weights(source)

    def state_dict(self, epoch: int) -> Dict[str, Any]:
        ctx = self.ctx
        # No scheduler state: the schedule is a function of the config and the step, rebuilt on resume
        # (timm's load_state_dict would bring back the old run's length and base LR with it).
        return {"epoch": epoch, "best_top1": self.best_top1, "best_epoch": self.best_epoch, "schedule": self.schedule,
                "layer_decay": self.cfg.train.layer_decay,
                "model": unwrap(self.model).state_dict(), "optimizer": ctx.optimizer.state_dict(),
                "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
                "ema": ctx.ema.state_dict() if ctx.ema is not None else None}

    def _load_optimizer(self, state: Dict[str, Any]) -> None:
        """The saved optimizer (its moments), with this config's layer-wise rate scales: torch would
        bring back the saved ones, silently ignoring a train.layer_decay changed on resume."""
        optimizer, saved, asked = self.ctx.optimizer, state.get("layer_decay"), self.cfg.train.layer_decay
        if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise CSKDError(f"this run's optimizer was saved with train.layer_decay={saved}, not {asked} (another set of "
                            f"parameter groups); resume with train.layer_decay={saved}, or start a new run from this one "
                            f"with student.init={self.run.path} (teacher.init for a teacher run)")
        scales = [group.get("lr_scale") for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, scale in zip(optimizer.param_groups, scales):
            if scale is not None:
                group["lr_scale"] = scale

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ctx = self.ctx
        self.model.load_state_dict(state["model"])
        self._load_optimizer(state)
        if ctx.scaler is not None and state.get("scaler"):
            ctx.scaler.load_state_dict(state["scaler"])
        if ctx.ema is not None and state.get("ema"):
            ctx.ema.load_state_dict(state["ema"])
        self.start_epoch, self.best_top1, self.best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
        self.resumed_schedule = state.get("schedule")  # absent in states written before it was saved
        # The optimizer came back with the old schedule's LR: set this schedule's at the resume point.
        ctx.scheduler.step_update(num_updates=self.start_epoch * self.steps_per_epoch)


def build_session(cfg: Config, env: DistEnv, resume: bool) -> Session:
    task = get_task(cfg.train.target)
    run = RunDir(cfg.output)
    run.prepare(resume, create=env.is_main)  # every rank checks, so all fail alike
    barrier(env)
    seed_everything(cfg.train.seed)
    loaders = build_loaders(cfg, env, task.img_size(cfg))
    spec = task.spec(cfg, loaders.info)
    model, init_report = task.create(spec, task.drop_path(cfg), None if resume else task.init(cfg))  # resume loads its own
    model = model.to(env.device)
    teacher = build_teacher_targets(cfg, loaders.info, loaders.train_split, env.device) if task.distils(cfg) else None
    mixup = build_mixup(cfg.data, cfg.train.batch_size, loaders.info.num_classes)
    optimizer = create_optimizer_v2(model, opt=cfg.train.opt, lr=scaled_lr(cfg, env.world_size), weight_decay=cfg.train.weight_decay,
                                    layer_decay=cfg.train.layer_decay)
    # Laid out in optimiser steps (timm's t_initial and warmup_t are epochs x updates per epoch): over
    # train.max_steps when it ends the run first.
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=budget_steps(cfg, len(loaders.train)),
        warmup_epochs=cfg.train.warmup_epochs * len(loaders.train), min_lr=cfg.train.min_lr, warmup_lr=cfg.train.warmup_lr,
        step_on_epochs=False, updates_per_epoch=1,
    )
    dtype = amp_dtype(cfg.train.amp, env.device)
    ctx = StepContext(
        task=task, model=_wrap_for_training(model, cfg, env), teacher=teacher,
        criterion=task.criterion(cfg, build_base_criterion(cfg, mixup is not None)), optimizer=optimizer,
        scheduler=scheduler, model_norm=Normalization(spec.mean, spec.std), env=env, amp_dtype=dtype,
        scaler=torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None, mixup=mixup,
        ema=ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None,
        clip_grad=cfg.train.clip_grad, decay=cfg.loss.decay, ckf_progress=cfg.loss.ckf_progress,
    )
    session = Session(cfg, env, run, task, spec, loaders, model, ctx, init_report=init_report)
    if resume:
        session.load_state_dict(load_state(run.state))
    return session


def budget_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The optimiser steps a run of ``cfg`` takes at ``steps_per_epoch``."""
    steps = cfg.train.epochs * steps_per_epoch
    return steps if cfg.train.max_steps is None else min(steps, int(cfg.train.max_steps))


def _wrap_for_training(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    wrapped = torch.compile(model) if cfg.train.compile else model
    if env.distributed:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return wrapped


# ---------------------------------------------------------------------------------------------
# Output: the main process prints and writes the run directory; other ranks stay quiet


@dataclass
class RunResult:
    run_dir: Path
    best_top1: float
    best_epoch: int
    final: Dict[str, Any]
    wall_s: float


class Quiet:
    """Non-main ranks: no output, no files."""

    show_progress = False

    def start(self, session: Session, resume: bool) -> None: ...

    def epoch_done(self, session: Session, epoch: int, metrics: Dict[str, Any], is_best: bool) -> None: ...

    def finish(self, session: Session, result: RunResult) -> None: ...


class MainProcess(Quiet):
    """Rank 0: the config, checkpoints, metrics and plots in the run directory, and the console."""

    def __init__(self, show_progress: bool, notes: Sequence[str] = ()) -> None:
        self.show_progress, self.notes = show_progress, notes
        self.guard_fired = False  # the guard speaks once per run, resumes included

    def start(self, session: Session, resume: bool) -> None:
        cfg, run = session.cfg, session.run
        # Rows past the resume state are of an epoch a crash cut short, redone now (on a fresh start:
        # of a run killed before its first state was saved).
        run.truncate_metrics(session.start_epoch)
        self.guard_fired = guard.fired(run.metrics())
        # The state called its last epoch the best, but the run may have stopped before writing best.safetensors.
        restored = resume and session.best_epoch == session.start_epoch - 1 and run.restore_best(session.start_epoch)
        run.save_config(cfg)
        kd = f"deit={cfg.loss.deit_type} cskd={cfg.loss.cskd_type} decay={cfg.loss.decay}" if session.task.distils(cfg) else "supervised"
        info = session.loaders.info
        if session.task.distils(cfg):
            report = pairing.compare(cfg.teacher.model, teacher_network(cfg, info), session.spec.model,
                                     session.task.deployable(session.model), (info.channels, session.spec.img_size, session.spec.img_size))
            run.save_pairing({**report.to_dict(), **session.teacher_accuracy.record()})
        loaders = session.loaders
        transfer = (f" + {loaders.transfer_images} unlabelled from {cfg.data.unlabeled}, {loaders.transfer_batch} per step"
                    if loaders.transfer_images else "")
        print(f"cskd train: {session.task.name} {session.spec.model} ({kd}) on {cfg.data.name} "
              f"[{loaders.labelled_images} images, {info.num_classes} classes{transfer}]")
        for line in (*self.notes, loaders.left_out):
            if line:
                print(f"  {line}")
        budget = f" (train.max_steps: {session.total_steps} in {session.epochs} epochs)" if cfg.train.max_steps else ""
        print(f"  device {session.env.device} x{session.env.world_size}, {session.steps_per_epoch} steps/epoch{budget}, "
              f"lr {scaled_lr(cfg, session.env.world_size):.2e}, run dir {run.path}"
              + (f", resuming at epoch {session.start_epoch + 1}" if resume else ""))
        if session.init_report is not None:
            print("\n".join(session.init_report.lines()))
        if restored:
            print(f"  restored {run.best.name} from {run.last.name}: epoch {session.start_epoch} is the best and the run "
                  "stopped before writing it")
        changes = schedule_changes(session.resumed_schedule, session.schedule) if session.resumed_schedule else []
        if changes:
            lr = current_lr(session.ctx.optimizer)
            print(f"  resumed with {', '.join(changes)}: the LR cosine and CKF continue from epoch {session.start_epoch} "
                  f"of {cfg.train.epochs} on the new schedule (lr now {lr:.2e})")
        if session.task.distils(cfg):
            print("\n".join([*report.lines(), session.teacher_accuracy.line(cfg.teacher.model)]), flush=True)

    def epoch_done(self, session: Session, epoch: int, metrics: Dict[str, Any], is_best: bool) -> None:
        run, info = session.run, {"epoch": epoch + 1, "val_top1": metrics[f"val_top1_{session.task.primary_head}"]}
        # The resume state marks the epoch done. A crash before it resumes by redoing the epoch (its
        # metrics row is dropped on resume and written again; best.safetensors is not written yet, so it
        # stays the state's best whatever the redo scores). A crash after it and before best resumes at
        # the next epoch, copying last.safetensors (this epoch's, written first) to best: see start().
        verdict = self.judge(session, metrics)
        if verdict is not None:
            metrics["guard"] = verdict.record()
        run.append_metrics(metrics)
        weights = session.deployable_weights
        save_weights(run.last, weights, session.spec, info)
        save_state(run.state, session.state_dict(epoch))
        if is_best:
            save_weights(run.best, weights, session.spec, info)
        print_epoch(metrics, session.task.primary_head, is_best)
        if verdict is not None:
            print(verdict.message(), flush=True)

    def judge(self, session: Session, metrics: Dict[str, Any]) -> Optional[guard.Verdict]:
        """The guard's verdict on the epochs so far, once per run (distilled students only); it only reports."""
        if self.guard_fired or session.teacher_accuracy is None:
            return None
        verdict = guard.judge_config(session.cfg, [*session.run.metrics(), metrics], session.teacher_accuracy.top1)
        self.guard_fired = verdict is not None
        return verdict

    def finish(self, session: Session, result: RunResult) -> None:
        rows = session.run.metrics()
        if rows:
            plot_curves(rows, session.run.curves)
        minutes, seconds = divmod(int(round(result.wall_s)), 60)
        print(f"done in {minutes}m{seconds:02d}s: best val top-1 ({session.task.primary_head}) {result.best_top1:.2f}% "
              f"at epoch {result.best_epoch}")
        print(f"  weights {session.run.best}, curves {session.run.curves}")
        print(f"  next: cskd eval {session.run.path}")


def schedule_changes(old: Dict[str, int], new: Dict[str, int]) -> List[str]:
    """``"name old -> new"`` for each value of the schedule that differs on resume."""
    names = {"epochs": "train.epochs", "batch_size": "train.batch_size", "world_size": "world size",
             "train_images": "training images", "steps_per_epoch": "steps/epoch", "transfer_images": "transfer images",
             "transfer_batch": "transfer images per step", "max_steps": "train.max_steps"}
    transfer = ("transfer_images", "transfer_batch", "max_steps")  # absent without a transfer set (a step budget): none
    return [f"{names[k]} {old.get(k, 'none')} -> {new.get(k, 'none')}" for k in names
            if (k in old or k in transfer) and old.get(k) != new.get(k)]


def print_epoch(metrics: Dict[str, Any], head: str, is_best: bool) -> None:
    parts = [f"epoch {metrics['epoch']:>3}", f"loss {metrics['loss']:.4f}", f"val top-1 {metrics[f'val_top1_{head}']:.2f}%"]
    if "val_top1_cls" in metrics:
        parts.append("(cls {val_top1_cls:.1f} / dist {val_top1_dist:.1f} / dense {val_top1_dense:.1f})".format(**metrics))
    parts += [f"{metrics['images_per_s']:.0f} img/s", f"ckf r {metrics['ckf_ratio']:.2f}" if "loss_cskd" in metrics else ""]
    print("  " + "  ".join(p for p in parts if p) + ("  *best" if is_best else ""), flush=True)


# ---------------------------------------------------------------------------------------------
# The loop


def run_epoch(session: Session, epoch: int, show_progress: bool) -> Dict[str, Any]:
    """Train one epoch (the last one cut short at ``train.max_steps``) and validate; returns the epoch's
    metrics row, with its optimiser steps and the seconds its validation took (``cskd plan`` times epochs from them)."""
    ctx, total_steps, per_epoch = session.ctx, session.total_steps, session.steps_per_epoch
    steps = min(per_epoch, total_steps - epoch * per_epoch)
    seed_everything(epoch_seed(session.cfg.train.seed, epoch) + session.env.rank)
    session.loaders.epochs.set_epoch(epoch)
    batches = session.loaders.train if steps == per_epoch else itertools.islice(session.loaders.train, steps)
    with progress(steps, f"epoch {epoch + 1}/{session.epochs}", "step", show_progress) as bar:
        train_metrics = train_one_epoch(ctx, batches, epoch, per_epoch, total_steps, bar)
    evaluated = ctx.ema.module if ctx.ema is not None else session.model
    started = time.perf_counter()
    val = evaluate(evaluated, session.task.head_logits, session.loaders.val, ctx.model_norm, session.env, ctx.amp_dtype)
    return {"epoch": epoch + 1, **train_metrics, "steps": steps, "val_s": round(time.perf_counter() - started, 3),
            **{f"val_top1_{h}": v for h, v in val["top1"].items()},
            **{f"val_top5_{h}": v for h, v in val["top5"].items()}}


def train(cfg: Config, resume: bool = False, show_progress: bool = True, notes: Sequence[str] = ()) -> RunResult:
    """Train according to ``cfg``; with ``resume`` continue the run in ``cfg.output``. ``notes``: lines
    about the config (what :func:`~cskd.config.load_config` dropped) printed with the run's start."""
    started = time.perf_counter()
    env = init_distributed(cfg.train.device)
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.output is None:
            cfg.output = str(RunDir.default_path(cfg.train.target))
        session = build_session(cfg, env, resume)
        out = MainProcess(show_progress, notes) if env.is_main else Quiet()
        if session.task.distils(cfg):  # every rank: the pass is shared out like validation
            session.teacher_accuracy = run_teacher_accuracy(cfg, session.loaders.info, session.ctx.teacher, session.loaders.val, env,
                                                            session.run.teacher_accuracy if resume else None, out.show_progress)
        out.start(session, resume)
        metrics: Dict[str, Any] = {}
        for epoch in range(session.start_epoch, session.epochs):
            epoch_started = time.perf_counter()
            metrics = run_epoch(session, epoch, out.show_progress)
            # both since the run started: an epoch's own time is time_s - epoch_start_s (the run's start left out)
            metrics["epoch_start_s"] = round(epoch_started - started, 2)
            metrics["time_s"] = round(time.perf_counter() - started, 2)
            top1 = metrics[f"val_top1_{session.task.primary_head}"]
            is_best = top1 > session.best_top1
            if is_best:
                session.best_top1, session.best_epoch = top1, epoch
            out.epoch_done(session, epoch, metrics, is_best)
            barrier(env)
        result = RunResult(session.run.path, session.best_top1, session.best_epoch + 1, metrics, time.perf_counter() - started)
        out.finish(session, result)
        return result
    finally:
        shutdown(env)
