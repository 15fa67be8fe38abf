"""CNN teacher: global logits plus the classifier applied at every cell of the feature map.

CSKD (Zhao et al., ICCV 2023) distils the teacher's *dense* predictions ``D_T[n, :, h, w] =
head(F[n, :, h, w])`` into the student's patch tokens. For a head made of global pooling and a
linear classifier, the spatial mean of ``D_T`` is exactly the ordinary (global) prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from cskd.checkpoint import load_into, resolve_checkpoint
from cskd.errors import CSKDError
from cskd.models.factory import create_timm_model, prefixed_group_matcher


class DenseTeacher(nn.Module):
    """Wraps a timm CNN; ``forward`` returns ``(dense [N,K,H,W], global [N,K])``.

    The dense logits run timm's own ``forward_head`` on each cell as a 1x1 feature map, so
    whatever the head does before its classifier (a LayerNorm in ConvNeXt, a BatchNorm) is applied
    per cell, and pooling over one cell is the identity.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise CSKDError(
                f"teacher {type(model).__name__} lacks timm's forward_features/forward_head; "
                "use a timm CNN (resnet*, regnet*, convnext*, efficientnet*...)"
            )
        self.model = model

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return prefixed_group_matcher(self.model, "model", coarse)  # train.layer_decay

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim != 4:
            raise CSKDError(
                f"teacher {type(self.model).__name__} gives features of shape {tuple(features.shape)}, "
                "not a spatial map [N, C, H, W]; CSKD needs a CNN teacher"
            )
        return features

    def dense_logits(self, features: torch.Tensor) -> torch.Tensor:
        n, c, h, w = features.shape
        cells = features.permute(0, 2, 3, 1).reshape(n * h * w, c, 1, 1)
        logits = self.model.forward_head(cells)
        return logits.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return self.dense_logits(features), self.model.forward_head(features)


def create_teacher(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    checkpoint: Optional[str | Path] = None,
    **timm_kwargs: Any,
) -> DenseTeacher:
    """Build a frozen CNN teacher whose forward returns ``(dense, global)`` logits.

    ``checkpoint`` is a cskd checkpoint or run directory (the architecture must match ``name``), a
    plain state dict (``.safetensors``, ``.pth``), or None for random weights. The teacher is
    returned in eval mode with gradients off.

    Example::

        teacher = create_teacher("resnet18", num_classes=10, output_stride=16)
        dense, global_logits = teacher(images)  # [N,10,14,14], [N,10] at 224 px
    """
    model = create_timm_model(name, "teacher", num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    teacher = DenseTeacher(model)
    if checkpoint is not None:
        load_into(teacher.model, resolve_checkpoint(checkpoint), role="teacher", expect_model=name)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
