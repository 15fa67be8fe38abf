"""Fuse the student's heads into one linear layer for deployment.

The inference output is the mean of the chosen heads: ``(z_cls + z_dist + mean_m head_dist(P_m))
/ 3`` for a CSKD student. ``head_dist`` is linear, so the dense term is ``head_dist(mean_m P_m)``,
and the whole mean is ONE linear layer on the concatenated features of the chosen heads (``[c, d,
mean(P)]``) with weight ``[W_cls | W_dist | W_dist] / 3`` and bias ``(b_cls + 2 b_dist) / 3``.
A student averaging fewer heads concatenates fewer features.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from cskd.models.student import DistilledStudent, check_heads


class FusedStudent(nn.Module):
    """The ViT trunk plus one linear head over the features of the chosen heads."""

    def __init__(self, trunk: nn.Module, head: nn.Linear, heads: Sequence[str], num_prefix_tokens: int = 2) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.heads = check_heads(heads)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        features = {"cls": lambda: tokens[:, 0], "dist": lambda: tokens[:, 1],
                    "dense": lambda: tokens[:, self.num_prefix_tokens :].mean(dim=1)}
        return self.head(torch.cat([features[h]() for h in self.heads], dim=-1))


@torch.no_grad()
def fuse_heads(student: DistilledStudent) -> FusedStudent:
    """Return an eval-mode copy of ``student`` with one linear head and the same eval output."""
    vit = copy.deepcopy(student.vit).eval()
    linear = {"cls": vit.head, "dist": vit.head_dist, "dense": vit.head_dist}
    chosen = [linear[h] for h in student.heads]
    head = nn.Linear(sum(layer.weight.shape[1] for layer in chosen), chosen[0].weight.shape[0]).to(chosen[0].weight)
    head.weight.copy_(torch.cat([layer.weight for layer in chosen], dim=1) / len(chosen))
    head.bias.copy_(sum(layer.bias for layer in chosen) / len(chosen))
    vit.head, vit.head_dist = nn.Identity(), nn.Identity()
    return FusedStudent(vit, head, student.heads, vit.num_prefix_tokens).eval()
