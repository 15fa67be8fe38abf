"""Recipes that distil invariance from a cache of clean teacher targets (``data.invariance``).

Noisy Student's and Soft-Randomization's rule, which a cache of clean targets fits exactly: the
student sees a noised image, its target stays the teacher's view of the clean one. Two kinds of
noise, applied in the loader's workers after the recorded crop and flip:

* tone operations (timm's RandAugment ops, drawn per image): they move no pixel, so the cached
  target is left alone;
* a small random rotation, scaling and translation (probability ``affine_prob``): pixels move, so
  the image is warped through an affine map that the cached teacher's dense target is warped
  through too (:mod:`cskd.data.geometry`), recorded as ``"affine"`` beside the crop box.

Run online (``teacher.cache: null``), the teacher sees the same noised view instead: Beyer et al.'s
consistent teaching, the arm the cached recipe is compared against.

Honest evaluation (AugMix's hygiene): a recipe names the shift families of the suite
(:mod:`cskd.data.shifts`) its operations overlap, ``trained_shifts``; its package carries them and
``cskd bench`` reports the other families apart, as shifts the student never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from cskd.data import geometry
from cskd.errors import CSKDError, did_you_mean


@dataclass(frozen=True)
class InvarianceRecipe:
    name: str
    tone_ops: Tuple[str, ...]  # timm RandAugment op names: tone only, so the target stays the clean image's
    tone_spec: str  # timm's RandAugment config string for them (ops per image, magnitude)
    affine_prob: float  # share of images moved by a random similarity
    max_rotate: float  # degrees, either way
    max_shift: float  # share of the side, per axis, either way
    scale: Tuple[float, float]  # magnification range
    trained_shifts: Tuple[str, ...]  # the suite's families these operations overlap (the rest are never seen)
    about: str


# Tone operations: AugMix's, less those that overlap the suite's weather family (brightness) and
# blur (sharpness, which blends with a blurred copy), plus contrast, which is the digital family's:
# the recipes train on digital shifts (contrast; posterize is a coarse quantisation, like JPEG's) and
# never see noise, blur or weather. Measured on the demo (docs/benchmarks.md, "Distilling invariance"):
# the pixel moves cost the 0.46M student about 5 clean points in its 24 epochs, tone alone 2-3 (seeds 0
# and 1), and tone alone already lifts fog, frost and brightness, which it never sees, above 0.8x of the teacher.
RECIPES: Dict[str, InvarianceRecipe] = {r.name: r for r in (
    InvarianceRecipe(
        name="tone",
        tone_ops=("AutoContrast", "ContrastIncreasing"),
        tone_spec="rand-n1-m9-mstd0.5-inc1-mmax10",
        affine_prob=0.0, max_rotate=0.0, max_shift=0.0, scale=(1.0, 1.0),
        trained_shifts=("digital",),
        about="one tone operation (autocontrast, or a contrast factor of about 0.2-1.8) on half the student's "
              "inputs; the target stays the clean image's. Holds out noise, blur, weather and geometry (14 shifts)",
    ),
    InvarianceRecipe(
        name="tone-affine",
        tone_ops=("AutoContrast", "Equalize", "PosterizeIncreasing", "SolarizeIncreasing", "ContrastIncreasing"),
        tone_spec="rand-n2-m9-mstd0.5-inc1-mmax9",
        affine_prob=0.5, max_rotate=15.0, max_shift=0.1, scale=(0.85, 1.15),
        trained_shifts=("digital", "geometric"),
        about="two tone operations (autocontrast, equalize, posterize, solarize, contrast) and, on half the inputs, a "
              "small similarity (rotation 15 deg, shift 10%, scale 0.85-1.15) that the dense target follows; more "
              "robust than tone, and for a student with the capacity and epochs to fit it (the demo's loses 5 points)",
    ),
)}


def get_recipe(name: Optional[str]) -> Optional[InvarianceRecipe]:
    """The recipe ``data.invariance`` names, None when it is off."""
    if name is None:
        return None
    if name not in RECIPES:
        raise CSKDError(f"data.invariance={name!r} is not a recipe; choose one of {sorted(RECIPES)} or null"
                        f"{did_you_mean(str(name), RECIPES)}")
    return RECIPES[name]


class ToneNoise:
    """A recipe's tone operations on a PIL image (timm's RandAugment restricted to them)."""

    def __init__(self, recipe: InvarianceRecipe) -> None:
        self.augment = rand_augment_transform(recipe.tone_spec, {}, transforms=list(recipe.tone_ops))

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.augment(image)


@dataclass
class AffineNoise:
    """Draws a recipe's random similarity for one image: its sampling map ``[2, 3]`` (identity when
    the image is left in place), and warps the image ``[C, H, W]`` through it (black outside)."""

    recipe: InvarianceRecipe

    def draw(self) -> torch.Tensor:
        r = self.recipe
        if float(torch.rand(())) >= r.affine_prob:
            return geometry.identity()[0]
        angle = (torch.rand(1) * 2 - 1) * r.max_rotate
        scale = r.scale[0] + torch.rand(1) * (r.scale[1] - r.scale[0])
        shift = (torch.rand(1, 2) * 2 - 1) * r.max_shift
        return geometry.similarity(angle, scale, shift)[0]

    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        theta = self.draw()
        if torch.equal(theta, geometry.identity()[0]):
            return image, theta
        return geometry.warp(image[None], theta[None], tuple(image.shape[-2:]))[0], theta
