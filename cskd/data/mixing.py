"""Mixup and CutMix (timm's), built from the data config."""

from __future__ import annotations

from typing import Optional

from timm.data import Mixup

from cskd.errors import CSKDError


def build_mixup(data, batch_size: int, num_classes: int) -> Optional[Mixup]:
    """timm's batch-wise Mixup/CutMix for ``data`` (a DataConfig), or None when both are off."""
    if data.mixup <= 0 and data.cutmix <= 0:
        return None
    if batch_size % 2:
        raise CSKDError(f"mixup/cutmix needs an even train.batch_size, got {batch_size}")
    return Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob, switch_prob=data.mixup_switch_prob,
                 label_smoothing=data.smoothing, num_classes=num_classes)
