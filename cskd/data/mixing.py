"""Mixup and CutMix (timm's), built from the data config, remembering what they did to each batch.

Cached teacher targets must be mixed exactly like the images: :class:`RecordingMixup` is timm's
batch-wise ``Mixup`` that keeps the last batch's mixing weight and CutMix box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam

from cskd.errors import CSKDError


@dataclass(frozen=True)
class MixRecord:
    """How a batch was mixed with its reverse (``x.flip(0)``)."""

    lam: float  # weight of the batch itself (1.0: not mixed)
    box: Optional[Tuple[int, int, int, int]]  # CutMix: (y0, y1, x0, x1) pixels pasted from the reverse; None: mixup
    size: Tuple[int, int]  # (height, width) of the images


class RecordingMixup(Mixup):
    """timm's Mixup/CutMix in ``batch`` mode; ``last`` says what the latest call did."""

    last: Optional[MixRecord] = None

    def _mix_batch(self, x: torch.Tensor) -> float:
        # timm's own _mix_batch, keeping the box it pastes
        lam, use_cutmix = self._params_per_batch()
        size = (x.shape[-2], x.shape[-1])
        if lam == 1.0:
            self.last = MixRecord(1.0, None, size)
            return 1.0
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            self.last = MixRecord(float(lam), (int(y0), int(y1), int(x0), int(x1)), size)
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
            self.last = MixRecord(float(lam), None, size)
        return lam


def build_mixup(data, batch_size: int, num_classes: int) -> Optional[RecordingMixup]:
    """timm's batch-wise Mixup/CutMix for ``data`` (a DataConfig), or None when both are off."""
    if data.mixup <= 0 and data.cutmix <= 0:
        return None
    if batch_size % 2:
        raise CSKDError(f"mixup/cutmix needs an even train.batch_size, got {batch_size}")
    return RecordingMixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
                          switch_prob=data.mixup_switch_prob, label_smoothing=data.smoothing, num_classes=num_classes)
