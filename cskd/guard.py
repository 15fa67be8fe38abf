"""The distillation guard: say when distilling from this teacher pulls the student down.

Distillation pays when the teacher knows more than the labels tell. From a teacher weaker than what
the labels alone teach, DeiT's and CSKD's targets pull the student down, and the fused prediction
averages the heads that learnt them (issue 28: teacher 83.6%, CSKD student 84.7% fused against 85.1%
without distillation). A distilled run's validation rows show it: the class token learns from the
labels only, the distillation token (DeiT) and the patch tokens (CSKD) from the teacher. The guard
fires when

* (a) the class token's top-1 is above the teacher's own validation top-1, or
* (b) the best teacher-taught head trails the class token by more than ``margin`` points,

judged only once ``min_progress`` of the epochs and at least :data:`WINDOW` epochs are done. It only reports: ``cskd train`` prints
the verdict once and records it in that epoch's metrics row; training goes on unchanged.
:func:`judge` is pure (rows in, verdict out); :func:`judge_run` replays it on a finished run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from cskd.config import Config, GuardConfig
from cskd.errors import CSKDError
from cskd.loss import teacher_heads
from cskd.run import RunDir

# Smooth over this many epochs: one epoch's validation top-1 moves by a point or more on a few
# thousand images, and a single lucky or unlucky epoch must not decide the verdict. Two is the
# least that averages a spike away and still answers within an epoch of the condition appearing.
WINDOW = 2
CLS_ABOVE_TEACHER = "cls_above_teacher"
TEACHER_HEADS_TRAIL = "teacher_heads_trail_cls"
DEFAULTS = GuardConfig()


@dataclass(frozen=True)
class Verdict:
    """Why the guard fired, with the figures it judged (validation top-1 in percent, each the mean of ``epochs``)."""

    reason: str  # CLS_ABOVE_TEACHER or TEACHER_HEADS_TRAIL
    epoch: int  # the epoch it fired at (1-based)
    epochs: Tuple[int, ...]  # the epochs averaged
    teacher_top1: float
    cls_top1: float
    heads_top1: Dict[str, float]  # the teacher-taught heads
    margin: float

    @property
    def best_head(self) -> Optional[str]:
        return max(self.heads_top1, key=self.heads_top1.__getitem__) if self.heads_top1 else None

    def finding(self) -> str:
        """What happened, with the numbers."""
        span = "" if len(self.epochs) == 1 else f" (mean of epochs {self.epochs[0]}-{self.epochs[-1]})"
        best = self.best_head
        taught = (f"the teacher-taught heads reach at best {self.heads_top1[best]:.1f}% ({best})" if best else "")
        if self.reason == CLS_ABOVE_TEACHER:
            return (f"the class token (label-trained) reaches {self.cls_top1:.1f}% on validation{span}, above the "
                    f"teacher's {self.teacher_top1:.1f}%" + (f", and {taught}" if taught else "")
                    + ": distillation from this teacher pulls the student down")
        return (f"the teacher-taught heads trail the class token (label-trained): at best {self.heads_top1[best]:.1f}% ({best}) "
                f"against {self.cls_top1:.1f}% on validation{span}, {self.cls_top1 - self.heads_top1[best]:.1f} points behind "
                f"(guard.margin {self.margin:g}); the teacher reaches {self.teacher_top1:.1f}%: distillation from this "
                "teacher pulls the student down")

    def advice(self) -> str:
        """What to do, for this run's switches."""
        steps = ["train or fine-tune the teacher further (`cskd train --resume TEACHER_RUN train.epochs=MORE`, or from "
                 "pretrained weights with `--config finetune-teacher`) until it beats a student trained without distillation"]
        if {"dist", "dense"} <= set(self.heads_top1):
            steps.append("distil with DeiT only (`loss.cskd_type=none`)")
        steps.append("train without distillation (`loss.deit_type=none loss.cskd_type=none`)")
        if "dense" in self.heads_top1:
            steps.append("lower `loss.cskd_weight`")
        return "; or ".join(steps)

    def message(self) -> str:
        """The lines ``cskd train`` prints."""
        return (f"  guard (epoch {self.epoch}): {self.finding()}.\n"
                f"    what to do: {self.advice()}.\n"
                "    this run goes on unchanged; metrics.jsonl records this in the epoch's \"guard\"")

    def record(self) -> Dict[str, Any]:
        """What the epoch's metrics row holds under ``"guard"``."""
        return {"fired": True, "reason": self.reason, "teacher_top1": self.teacher_top1, "cls_top1": self.cls_top1,
                "heads_top1": self.heads_top1, "margin": self.margin, "epochs": list(self.epochs),
                "message": f"{self.finding()}. What to do: {self.advice()}."}


def judge(rows: Sequence[Mapping[str, Any]], teacher_top1: float, heads: Sequence[str], epochs: int,
          margin: float = DEFAULTS.margin, min_progress: float = DEFAULTS.min_progress) -> Optional[Verdict]:
    """The guard's verdict after the last of ``rows`` (metrics rows of epochs 1..n, in order), or None.

    ``heads``: the heads the loss teaches from the teacher (:func:`cskd.loss.teacher_heads`: ``dist``
    for DeiT, ``dist`` and ``dense`` for CSKD); ``epochs``: the run's length; ``teacher_top1``: the
    teacher's top-1 on the same validation images. Each head's top-1 is the mean of the last
    :data:`WINDOW` epochs. Condition (b) compares the BEST teacher-taught head with the class token:
    it says distillation does not pay only when no head the teacher taught keeps up with the labels.
    One taught head can trail the class token for epochs on a run where distillation pays: in the
    demo run from the 92% teacher the distillation token was 2.4 points under the class token at
    epoch 7 while the patch tokens led; judging the worst head would fire there.
    """
    if not rows or epochs < 1:
        return None
    epoch = int(rows[-1]["epoch"])
    if epoch / epochs < min_progress or len(rows) < WINDOW:  # a short run's first epoch is one epoch, not a window
        return None
    window = rows[-WINDOW:]
    try:
        cls = fmean(float(r["val_top1_cls"]) for r in window)
        taught = {h: fmean(float(r[f"val_top1_{h}"]) for r in window) for h in heads}
    except KeyError as exc:
        raise CSKDError(f"the metrics rows of epochs {window[0]['epoch']}-{epoch} have no {exc.args[0]}; the guard "
                        "judges distilled student runs (per-head validation top-1)") from None
    spanned = tuple(int(r["epoch"]) for r in window)
    verdict = dict(epoch=epoch, epochs=spanned, teacher_top1=float(teacher_top1), cls_top1=cls, heads_top1=taught, margin=margin)
    if cls > teacher_top1:
        return Verdict(CLS_ABOVE_TEACHER, **verdict)
    if taught and cls - max(taught.values()) > margin:
        return Verdict(TEACHER_HEADS_TRAIL, **verdict)
    return None


def taught_heads(cfg: Config) -> Tuple[str, ...]:
    """The heads a run's loss teaches from the teacher; none for runs the guard does not judge
    (teacher runs, students without distillation)."""
    if cfg.train.target != "student":
        return ()
    return teacher_heads(cfg.loss.alpha, cfg.loss.deit_type, cfg.loss.cskd_type, cfg.loss.cskd_weight)


def judge_config(cfg: Config, rows: Sequence[Mapping[str, Any]], teacher_top1: float, margin: Optional[float] = None,
                 min_progress: Optional[float] = None) -> Optional[Verdict]:
    """:func:`judge` with a run config's loss switches, length and guard settings (``margin`` and
    ``min_progress`` override the config's); None for runs the guard does not judge (teachers, no distillation)."""
    heads = taught_heads(cfg)
    if not heads:
        return None
    return judge(rows, teacher_top1, heads, cfg.train.epochs, cfg.guard.margin if margin is None else margin,
                 cfg.guard.min_progress if min_progress is None else min_progress)


def fired(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the guard already fired in these metrics rows (it fires once per run, resumes included)."""
    return any((row.get("guard") or {}).get("fired") for row in rows)


def judge_run(run_dir: str | Path, teacher_top1: Optional[float] = None, margin: Optional[float] = None,
              min_progress: Optional[float] = None) -> Optional[Verdict]:
    """Replay the guard over a run's metrics.jsonl, epoch by epoch: the first verdict, as the run would
    have fired it, or None. The teacher's top-1 is the run's own record (pairing.json) unless given;
    ``margin`` and ``min_progress`` are the run's config's unless given."""
    run = RunDir.open(run_dir)
    cfg = run.config()
    if not taught_heads(cfg):
        raise CSKDError(f"{run.path} is not a distilled student run (train.target={cfg.train.target}, loss.deit_type="
                        f"{cfg.loss.deit_type}, loss.cskd_type={cfg.loss.cskd_type}); the guard judges distilled student runs")
    if teacher_top1 is None:
        teacher_top1 = run.teacher_val_top1
    if teacher_top1 is None:
        raise CSKDError(f"{run.path} has no teacher top-1 in {RunDir.PAIRING} (a run made before it was recorded); "
                        "pass teacher_top1=, e.g. the figure `cskd cache-teacher` prints for its teacher")
    rows = run.metrics()
    for n in range(1, len(rows) + 1):
        verdict = judge_config(cfg, rows[:n], teacher_top1, margin, min_progress)
        if verdict is not None:
            return verdict
    return None
