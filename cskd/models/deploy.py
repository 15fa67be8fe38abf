"""The module that gets deployed: a fused student (or teacher) plus optional in-graph preprocessing."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn


class DeployModule(nn.Module):
    """``input -> logits`` (and ``probabilities``): the one graph every engine is built from.

    With ``uint8_input`` the graph takes raw pixels ``[N, C, H, W]`` in 0..255 and applies the
    scaling and normalisation itself, so clients send images without knowing mean and std.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], uint8_input: bool, probabilities: bool):
        super().__init__()
        self.model = model
        self.uint8_input = uint8_input
        self.probabilities = probabilities
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift, one multiply-add in the graph
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.uint8_input:
            x = x.float() * self.scale + self.shift
        logits = self.model(x)
        if self.probabilities:
            return logits, logits.softmax(dim=-1)
        return logits


def output_names(probabilities: bool) -> List[str]:
    return ["logits", "probabilities"] if probabilities else ["logits"]
