"""Fuse the student's three heads into one linear layer for deployment.

The inference output is ``(z_cls + z_dist + mean_m head_dist(P_m)) / 3``. ``head_dist`` is
linear, so the last term is ``head_dist(mean_m P_m)``, and the whole sum is ONE linear layer on
``[c, d, mean(P)]`` with weight ``[W_cls | W_dist | W_dist] / 3`` and bias ``(b_cls + 2 b_dist) / 3``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cskd.models.student import DistilledStudent


class FusedStudent(nn.Module):
    """The ViT trunk plus one linear head over ``[class token, distillation token, mean patch]``."""

    def __init__(self, trunk: nn.Module, head: nn.Linear, num_prefix_tokens: int = 2) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = torch.cat(
            [tokens[:, 0], tokens[:, 1], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1
        )
        return self.head(pooled)


@torch.no_grad()
def fuse_heads(student: DistilledStudent) -> FusedStudent:
    """Return an eval-mode copy of ``student`` with one linear head and the same eval output."""
    vit = copy.deepcopy(student.vit).eval()
    w_cls, b_cls = vit.head.weight, vit.head.bias
    w_dist, b_dist = vit.head_dist.weight, vit.head_dist.bias
    head = nn.Linear(3 * w_cls.shape[1], w_cls.shape[0]).to(w_cls)
    head.weight.copy_(torch.cat([w_cls, w_dist, w_dist], dim=1) / 3)
    head.bias.copy_((b_cls + 2 * b_dist) / 3)
    vit.head, vit.head_dist = nn.Identity(), nn.Identity()
    return FusedStudent(vit, head, vit.num_prefix_tokens).eval()
