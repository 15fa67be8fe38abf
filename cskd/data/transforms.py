"""Training and evaluation transforms (timm's), producing unnormalised tensors in [0, 1].

Normalisation happens on the batch, once for the student and once for the teacher, because the
two may expect different statistics while they must see the very same augmented image.

The training transform also says where its crop came from: the random-resized crop box (in [0, 1]
coordinates of the source image) and whether it flipped the image, which is what cached teacher
targets follow (:mod:`cskd.teachers`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_train

from cskd.data.invariance import AffineNoise, InvarianceRecipe, ToneNoise, get_recipe

RE_MODES = ("const", "rand", "pixel")  # timm's random-erasing fills
# {"box": [x0, y0, x1, y1] in [0, 1] of the source image, "flip": bool; with an invariance recipe,
# "affine": [2, 3], the sampling map of its warp after them (cskd.data.geometry)}
Geometry = Dict[str, torch.Tensor]


class RecordedCropFlip:
    """timm's random-resized crop and a horizontal flip, returning the image and its geometry."""

    def __init__(self, crop: RandomResizedCropAndInterpolation, hflip: float) -> None:
        self.crop, self.hflip = crop, hflip

    def __call__(self, image: Image.Image) -> Tuple[Image.Image, Geometry]:
        full_w, full_h = TF.get_image_size(image)
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = interpolation[int(torch.randint(len(interpolation), ()))]
        image = TF.resized_crop(image, top, left, height, width, list(self.crop.size), interpolation)
        flip = bool(torch.rand(()) < self.hflip)
        if flip:
            image = TF.hflip(image)
        box = torch.tensor([left / full_w, top / full_h, (left + width) / full_w, (top + height) / full_h])
        return image, {"box": box, "flip": torch.tensor(flip)}


class TrainTransform:
    """crop and flip (recorded) -> timm's RandAugment or colour jitter -> an invariance recipe's tone
    noise -> tensor and random erasing -> the recipe's affine noise (recorded)."""

    def __init__(self, crop_flip: RecordedCropFlip, pixels: Callable, final: Callable,
                 recipe: Optional[InvarianceRecipe] = None) -> None:
        self.crop_flip, self.pixels, self.final = crop_flip, pixels, final
        self.tone = ToneNoise(recipe) if recipe else None
        self.affine = AffineNoise(recipe) if recipe else None

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, Geometry]:
        image, geometry = self.crop_flip(image)
        image = self.pixels(image)
        if self.tone is not None:
            image = self.tone(image)
        tensor = self.final(image)
        if self.affine is not None:
            tensor, geometry["affine"] = self.affine(tensor)
        return tensor, geometry


def train_transform(
    img_size: int,
    channels: int,
    auto_augment: Optional[str],
    scale: Sequence[float],
    hflip: float,
    reprob: float,
    interpolation: str = "bicubic",
    color_jitter: float = 0.0,
    re_mode: str = "const",
    invariance: Optional[str] = None,
) -> TrainTransform:
    """DeiT's training augmentation (timm's pieces) and an invariance recipe (``data.invariance``);
    the result maps an image to ``(tensor, geometry)``."""
    if auto_augment and auto_augment.startswith("rand") and "inc1" in auto_augment and "mmax" not in auto_augment:
        # At magnitude 10 timm's PosterizeIncreasing keeps 0 bits, which Pillow >= 13 rejects;
        # capping at 9 keeps 1 bit and leaves every other op as good as unchanged.
        auto_augment += "-mmax9"
    primary, pixels, final = transforms_imagenet_train(
        img_size, scale=tuple(scale), hflip=hflip, auto_augment=auto_augment or None, interpolation=interpolation,
        color_jitter=color_jitter or None,  # timm applies it only when auto_augment is off
        re_prob=reprob, re_mode=re_mode, mean=(0.0,) * channels, std=(1.0,) * channels, separate=True,
    )
    crop = next(t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    return TrainTransform(RecordedCropFlip(crop, hflip), pixels, final, get_recipe(invariance))


def eval_transform(img_size: int, channels: int, interpolation: str = "bicubic", crop_pct: float = 1.0,
                   crop_mode: str = "center") -> Callable:
    """Resize the shorter side to ``img_size / crop_pct``, centre-crop ``img_size`` (timm's eval transform);
    ``crop_mode="squash"`` resizes each side to ``img_size / crop_pct`` instead (aspect ratio not kept)."""
    identity = dict(mean=(0.0,) * channels, std=(1.0,) * channels)
    return create_transform(
        input_size=(channels, img_size, img_size), is_training=False, crop_pct=crop_pct, crop_mode=crop_mode,
        interpolation=interpolation, **identity,
    )


def whole_image_transform(img_size: int, channels: int, interpolation: str = "bicubic") -> Callable:
    """The whole image resized to ``img_size`` x ``img_size``, nothing cropped: what a teacher cache is made of.

    Training crops (:class:`RecordedCropFlip`) may take any part of the image and record their box
    in [0, 1] coordinates of the whole image, so the cached map must cover the whole image too. A
    centre crop would cover only the central square of a non-square image, and every box would
    land on the wrong cells. Squashing is exact where it matters: a box of the squashed image,
    resized to the student's square, is the same pixels as the box of the original image resized
    to it (both are per-axis scalings), which is what the training crop does.
    """
    return eval_transform(img_size, channels, interpolation, crop_pct=1.0, crop_mode="squash")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel for a batch ``[N, C, H, W]`` of [0, 1] images."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
