"""Where a training image's pixels came from, as one affine map, and sampling through it.

Every geometric augmentation a cached teacher follows is an affine map from the augmented image's
coordinates to the source image's: the random-resized crop (a box), the horizontal flip, and a
recipe's small rotation, translation and scaling (:mod:`cskd.data.invariance`). Here they are
``[N, 2, 3]`` matrices ``theta`` in torch's normalised coordinates (``affine_grid``, corners at
+-1, ``align_corners=False``), composed by :func:`compose`. :func:`warp` samples through one: the
images with it (a pixel per sample), the teacher's dense maps with it (RoIAlign's rule: each output
cell averages an even grid of bilinear samples, enough to cover what the cell maps onto), so the
image and its target move together by construction.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def identity(count: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[count, 2, 3]`` identity maps."""
    return torch.eye(2, 3, dtype=dtype).expand(count, 2, 3).clone()


def box_theta(boxes: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """The map from a crop's coordinates to its source image's: ``boxes`` ``[N, 4]`` (x0, y0, x1, y1
    in [0, 1] of the source), then a horizontal flip of the crop where ``flips`` is true."""
    boxes = boxes.float()
    x0, y0, x1, y1 = boxes.unbind(1)
    sign = torch.ones_like(x0) if flips is None else 1.0 - 2.0 * flips.to(boxes.device).float()
    zero = torch.zeros_like(x0)
    return torch.stack([torch.stack([(x1 - x0) * sign, zero, x0 + x1 - 1.0], 1),
                        torch.stack([zero, y1 - y0, y0 + y1 - 1.0], 1)], 1)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``outer`` after ``inner``: a point maps through ``inner`` first (both ``[N, 2, 3]``)."""
    return outer[..., :2] @ inner + torch.cat([torch.zeros_like(outer[..., :2]), outer[..., 2:]], dim=-1)


def similarity(angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``[N, 2, 3]``: the output shows the input rotated by ``angle_deg`` (counter-clockwise on the
    screen) and magnified ``scale`` times about its centre, then moved by ``shift`` ``[N, 2]`` (x
    right, y down, in shares of the side). As a sampling map it is that motion's inverse: output
    point p shows input point R^-1 (p - 2 shift) / scale."""
    angle = torch.deg2rad(angle_deg.float())
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # R^-1 / scale, y pointing down
    tx, ty = 2.0 * shift[:, 0].float(), 2.0 * shift[:, 1].float()
    return torch.stack([torch.stack([cos, -sin, -(cos * tx - sin * ty)], 1),
                        torch.stack([sin, cos, -(sin * tx + cos * ty)], 1)], 1)


def samples_per_cell(theta: torch.Tensor, source: Tuple[int, int], size: Tuple[int, int]) -> Tuple[int, int]:
    """RoIAlign's adaptive sampling: per output cell and axis, as many samples as the source cells
    the cell spans (the most over the batch)."""
    span_x = torch.linalg.vector_norm(theta[:, :, 0], dim=1).max().item()  # source half-widths per output half-width
    span_y = torch.linalg.vector_norm(theta[:, :, 1], dim=1).max().item()
    return (max(1, math.ceil(span_y * source[0] / size[0] - 1e-6)), max(1, math.ceil(span_x * source[1] / size[1] - 1e-6)))


def warp(inputs: torch.Tensor, theta: torch.Tensor, size: Tuple[int, int], average: bool = False,
         padding: str = "zeros") -> torch.Tensor:
    """``inputs`` ``[N, C, H, W]`` sampled through ``theta`` onto ``size``. ``average``: each output
    cell is the mean of RoIAlign's grid of bilinear samples (for maps); else one bilinear sample per
    pixel (for images). ``padding``: what lies outside the input (``zeros``, ``border``)."""
    rows, cols = samples_per_cell(theta, inputs.shape[-2:], size) if average else (1, 1)
    grid = F.affine_grid(theta.to(inputs), [len(inputs), inputs.shape[1], size[0] * rows, size[1] * cols], align_corners=False)
    sampled = F.grid_sample(inputs, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return F.avg_pool2d(sampled, (rows, cols)) if (rows, cols) != (1, 1) else sampled
