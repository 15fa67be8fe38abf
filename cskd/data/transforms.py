"""Training and evaluation transforms (timm's), producing unnormalised tensors in [0, 1].

Normalisation happens on the batch, once for the student and once for the teacher, because the
two may expect different statistics while they must see the very same augmented image.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from timm.data import create_transform


def train_transform(
    img_size: int,
    channels: int,
    auto_augment: Optional[str],
    scale: Sequence[float],
    hflip: float,
    reprob: float,
    interpolation: str = "bicubic",
    color_jitter: float = 0.0,
) -> Callable:
    identity = dict(mean=(0.0,) * channels, std=(1.0,) * channels)
    if auto_augment and auto_augment.startswith("rand") and "inc1" in auto_augment and "mmax" not in auto_augment:
        # At magnitude 10 timm's PosterizeIncreasing keeps 0 bits, which Pillow >= 13 rejects;
        # capping at 9 keeps 1 bit and leaves every other op as good as unchanged.
        auto_augment += "-mmax9"
    return create_transform(
        input_size=(channels, img_size, img_size),
        is_training=True,
        auto_augment=auto_augment or None,
        scale=tuple(scale),
        hflip=hflip,
        re_prob=reprob,
        re_mode="const",
        color_jitter=color_jitter or None,  # timm applies it only when auto_augment is off
        interpolation=interpolation,
        **identity,
    )


def eval_transform(img_size: int, channels: int, interpolation: str = "bicubic") -> Callable:
    identity = dict(mean=(0.0,) * channels, std=(1.0,) * channels)
    return create_transform(
        input_size=(channels, img_size, img_size), is_training=False, crop_pct=1.0, interpolation=interpolation, **identity
    )


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel for a batch ``[N, C, H, W]`` of [0, 1] images."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
