"""DeiT-style ViT student with class, distillation and dense patch outputs.

After the final norm the ViT yields a class token ``c``, a distillation token ``d`` and patch
tokens ``P``. ``z_cls = head(c)``, ``z_dist = head_dist(d)``, and the dense logits ``Z =
head_dist(P)`` reshaped to the patch grid: the distillation head is shared by the distillation
token and the patch tokens (CSKD, Zhao et al., ICCV 2023).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from cskd.errors import CSKDError
from cskd.models.factory import create_timm_model, prefixed_group_matcher

HEADS = ("cls", "dist", "dense")  # class token, distillation token, mean of the patch tokens


def check_heads(heads: Sequence[str]) -> Tuple[str, ...]:
    """``heads`` in canonical order; an unknown or empty selection is an error."""
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise CSKDError(f"student heads {list(heads)} must be a non-empty subset of {list(HEADS)}")
    return tuple(h for h in HEADS if h in heads)


class StudentOutput(NamedTuple):
    cls: torch.Tensor  # [N, K] class-token logits
    dist: torch.Tensor  # [N, K] distillation-token logits
    dense: torch.Tensor  # [N, K, h, w] patch-token logits through head_dist

    def head(self, name: str) -> torch.Tensor:
        """One head's image-level logits ``[N, K]`` (the dense head averaged over the grid)."""
        return self.dense.mean(dim=(2, 3)) if name == "dense" else getattr(self, name)

    def fused(self, heads: Sequence[str] = HEADS) -> torch.Tensor:
        """The inference prediction: the mean of the chosen heads (all three for a CSKD student)."""
        return sum(self.head(h) for h in heads) / len(heads)


class DistilledStudent(nn.Module):
    """Wraps a timm distilled ViT; train-mode forward gives a tuple, eval-mode the fused logits.

    ``heads`` are the heads the eval-mode prediction averages: the ones the loss trained (a DeiT
    student never trains its patch tokens, so averaging them in would only add noise).
    """

    def __init__(self, vit: nn.Module, heads: Sequence[str] = HEADS) -> None:
        super().__init__()
        self.heads = check_heads(heads)
        if not hasattr(vit, "head_dist") or getattr(vit, "num_prefix_tokens", 0) != 2:
            distilled = ", ".join(timm.list_models("deit*distilled*"))
            raise CSKDError(
                f"student {type(vit).__name__} has no distillation token; use a distilled DeiT "
                f"({distilled}, or cskd_deit_nano_distilled_patch4_32)"
            )
        self.vit = vit

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_classes(self) -> int:
        return int(self.vit.num_classes)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return prefixed_group_matcher(self.vit, "vit", coarse)  # train.layer_decay

    def forward_heads(self, x: torch.Tensor) -> StudentOutput:
        tokens = self.vit.head_drop(self.vit.forward_features(x))
        n, h, w = tokens.shape[0], *self.grid_size
        patches = tokens[:, self.vit.num_prefix_tokens :]
        dense = self.vit.head_dist(patches).transpose(1, 2).reshape(n, -1, h, w)
        return StudentOutput(self.vit.head(tokens[:, 0]), self.vit.head_dist(tokens[:, 1]), dense)

    def forward(self, x: torch.Tensor) -> Union[StudentOutput, torch.Tensor]:
        out = self.forward_heads(x)
        return out if self.training else out.fused(self.heads)


def create_student(
    name: str,
    num_classes: int,
    img_size: int,
    patch_size: int,
    in_chans: int = 3,
    heads: Optional[Sequence[str]] = None,
    **timm_kwargs: Any,
) -> DistilledStudent:
    """Build a distilled DeiT at any image size, patch size and channel count.

    ``heads`` chooses what the eval-mode prediction averages (default all three: cls, dist, dense).

    Example::

        student = create_student("deit_tiny_distilled_patch16_224", 1000, img_size=224, patch_size=16)
        student.train(); z_cls, z_dist, dense = student(images)   # dense: [N, 1000, 14, 14]
        student.eval();  logits = student(images)                 # (z_cls + z_dist + mean dense) / 3
    """
    if img_size % patch_size:
        raise CSKDError(
            f"student.img_size={img_size} is not a multiple of student.patch_size={patch_size}; "
            "pick sizes that divide evenly"
        )
    vit = create_timm_model(
        name, "student", num_classes=num_classes, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, **timm_kwargs,
    )
    return DistilledStudent(vit, heads or HEADS)
