"""Cumulative Spatial Knowledge Distillation loss (Zhao, Song and Liang, ICCV 2023).

``L = (1 - alpha) * L_base + alpha * L_deit + lambda * L_cskd``

* ``L_base``: the class token against the labels (label smoothing or mixup soft targets).
* ``L_deit``: the distillation token against the teacher's global logits ``G_T`` (DeiT).
* ``L_cskd``: the dense patch logits against the fused target ``Y = r D_T + (1 - r) G_T``, where the
  Cumulative Knowledge Fusion ratio ``r`` decays from 1 to 0 over training: patch tokens first
  learn the CNN's local responses, then the global answer.

Switches give the baselines: ``cskd_type="none"`` is DeiT distillation; ``deit_type="none"`` with
``cskd_type="none"`` is supervised training (the distillation token then learns the labels too, so
the fused prediction stays meaningful); ``decay="none"`` keeps ``r = 1`` (no CKF).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DECAYS = ("linear", "x2", "cos", "none")
KD_TYPES = ("hard", "soft", "none")
CKF_PROGRESS = ("step", "epoch")  # how training progress x is counted


def training_progress(step: int, steps_per_epoch: int, total_steps: int, counting: str = "step") -> float:
    """Progress ``x`` in [0, 1] for the CKF ratio at optimisation step ``step`` (0-based).

    ``step``: the continuous fraction ``step / total_steps`` (cskd's default: short runs decay
    smoothly); ``epoch``: whole epochs, ``epoch / epochs`` as the official CSKD code counts.
    """
    if counting == "epoch":
        return (step // steps_per_epoch) * steps_per_epoch / total_steps
    return step / total_steps


def needs_teacher(deit_type: str, cskd_type: str) -> bool:
    """Whether these switches distil at all (else it is plain supervised training)."""
    return deit_type != "none" or cskd_type != "none"


def trained_heads(alpha: float, deit_type: str, cskd_type: str, cskd_weight: float) -> Tuple[str, ...]:
    """The student heads this loss trains, hence the ones its prediction should average.

    The class token learns from the labels (weight 1 - alpha), the distillation token from the
    teacher or, without one, from the labels (weight alpha), the patch tokens only from CSKD.
    """
    heads = [name for name, on in (("cls", alpha < 1), ("dist", alpha > 0),
                                   ("dense", cskd_type != "none" and cskd_weight > 0)) if on]
    return tuple(heads)


def teacher_heads(alpha: float, deit_type: str, cskd_type: str, cskd_weight: float) -> Tuple[str, ...]:
    """The student heads this loss teaches from the teacher: the distillation token under DeiT's term
    (without it, it learns the labels), the patch tokens under CSKD's. Empty without distillation."""
    heads = [name for name, on in (("dist", alpha > 0 and deit_type != "none"),
                                   ("dense", cskd_type != "none" and cskd_weight > 0)) if on]
    return tuple(heads)


def ckf_ratio(progress: float, decay: str) -> float:
    """Weight ``r`` of the teacher's dense logits at training progress ``x = t / T`` in [0, 1]."""
    x = min(max(float(progress), 0.0), 1.0)
    if decay == "linear":
        return 1.0 - x
    if decay == "x2":
        return (1.0 - x) ** 2
    if decay == "cos":
        return math.cos(math.pi * x / 2)
    if decay == "none":
        return 1.0
    raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")


def align_grids(student_dense: torch.Tensor, teacher_dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the finer grid's logits to the coarser grid (per axis, adaptive pooling)."""
    size = (min(student_dense.shape[-2], teacher_dense.shape[-2]), min(student_dense.shape[-1], teacher_dense.shape[-1]))
    pool = lambda t: t if tuple(t.shape[-2:]) == size else F.adaptive_avg_pool2d(t, size)  # noqa: E731
    return pool(student_dense), pool(teacher_dense)


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum KL(softmax(teacher/tau) || softmax(student/tau))`` over every element, times tau^2."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        * tau
        * tau
    )


def deit_loss(z_dist: torch.Tensor, teacher_global: torch.Tensor, kind: str, tau: float = 1.0) -> torch.Tensor:
    """DeiT's distillation-token loss: hard ``CE(z_dist, argmax G_T)`` or soft KL at temperature tau."""
    if kind == "hard":
        return F.cross_entropy(z_dist, teacher_global.argmax(dim=1))
    if kind == "soft":
        # DeiT divides the summed KL by numel, not by the batch (facebookresearch/deit losses.py).
        return _kl_sum(z_dist, teacher_global, tau) / z_dist.numel()
    raise ValueError(f"deit kind must be 'hard' or 'soft', got {kind!r}")


def cskd_loss(
    student_dense: torch.Tensor,
    teacher_dense: torch.Tensor,
    teacher_global: torch.Tensor,
    progress: float,
    kind: str,
    decay: str = "linear",
    tau: float = 1.0,
) -> torch.Tensor:
    """Dense loss between student patch logits ``[N,K,h,w]`` and the CKF target on the aligned grid."""
    if student_dense.ndim != 4 or teacher_dense.ndim != 4:
        raise ValueError(
            f"dense logits must be [N, K, h, w]; got student {tuple(student_dense.shape)}, teacher {tuple(teacher_dense.shape)}"
        )
    student_dense, teacher_dense = align_grids(student_dense, teacher_dense)
    r = ckf_ratio(progress, decay)
    target = r * teacher_dense + (1.0 - r) * teacher_global[:, :, None, None]
    if kind == "hard":
        return F.cross_entropy(student_dense, target.argmax(dim=1))  # mean over batch and cells
    if kind == "soft":
        # Summed over classes and cells, divided by the batch size: the official CSKD normalisation.
        return _kl_sum(student_dense, target, tau) / student_dense.shape[0]
    raise ValueError(f"cskd kind must be 'hard' or 'soft', got {kind!r}")


class CSKDLoss(nn.Module):
    """The total loss; ``forward`` returns a dict with ``loss`` and each weighted-in part.

    Args:
        base_criterion: ``(logits, targets) -> loss`` for the labels (targets may be soft).
        alpha: weight of the distillation token's term; the class token gets ``1 - alpha``.
        deit_type, cskd_type: "hard", "soft" or "none".
        cskd_weight: lambda, the weight of the dense term.
        decay: the CKF schedule: "linear", "x2", "cos" or "none".
        tau: distillation temperature for the soft variants.
    """

    def __init__(
        self,
        base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        alpha: float = 0.5,
        deit_type: str = "hard",
        cskd_type: str = "hard",
        cskd_weight: float = 1.0,
        decay: str = "linear",
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("deit_type", deit_type, KD_TYPES), ("cskd_type", cskd_type, KD_TYPES), ("decay", decay, DECAYS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.base_criterion = base_criterion
        self.alpha, self.deit_type, self.cskd_type = alpha, deit_type, cskd_type
        self.cskd_weight, self.decay, self.tau = cskd_weight, decay, tau

    @property
    def needs_teacher(self) -> bool:
        return needs_teacher(self.deit_type, self.cskd_type)

    @property
    def heads(self) -> Tuple[str, ...]:
        return trained_heads(self.alpha, self.deit_type, self.cskd_type, self.cskd_weight)

    def forward(
        self,
        student_out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
        teacher_out: Tuple[torch.Tensor, torch.Tensor] | None,
        progress: float,
    ) -> Dict[str, torch.Tensor]:
        z_cls, z_dist, dense = student_out
        if self.needs_teacher and teacher_out is None:
            raise ValueError("teacher outputs (dense, global) are required when deit_type or cskd_type is not 'none'")
        labelled = len(targets)  # the first rows; unlabelled transfer images follow and learn from the teacher only
        parts = {"base": self.base_criterion(z_cls[:labelled], targets)}
        if self.deit_type == "none":
            parts["deit"] = self.base_criterion(z_dist[:labelled], targets)  # no teacher: the dist token learns labels
        else:
            parts["deit"] = deit_loss(z_dist, teacher_out[1], self.deit_type, self.tau)
        loss = (1.0 - self.alpha) * parts["base"] + self.alpha * parts["deit"]
        if self.cskd_type != "none":
            parts["cskd"] = cskd_loss(dense, teacher_out[0], teacher_out[1], progress, self.cskd_type, self.decay, self.tau)
            loss = loss + self.cskd_weight * parts["cskd"]
        parts["loss"] = loss
        return parts
