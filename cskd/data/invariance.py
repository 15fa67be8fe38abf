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


# Tone: AugMix's tone operations less those that overlap the suite's weather family (brightness)
# and blur (sharpness, which blends with a blurred copy), plus contrast: so the recipe trains on the
# digital family (contrast; posterize is a coarse quantisation, like JPEG's) and on geometry, and
# never sees noise, blur or weather: 11 of the 15 corruptions are held out.
RECIPES: Dict[str, InvarianceRecipe] = {r.name: r for r in (
    InvarianceRecipe(
        name="tone-affine",
        tone_ops=("AutoContrast", "Equalize", "PosterizeIncreasing", "SolarizeIncreasing", "ContrastIncreasing"),
        tone_spec="rand-n2-m9-mstd0.5-inc1-mmax9",
        affine_prob=0.5, max_rotate=15.0, max_shift=0.1, scale=(0.85, 1.15),
        trained_shifts=("digital", "geometric"),
        about="tone (autocontrast, equalize, posterize, solarize, contrast) and small similarities "
              "(rotation 15 deg, shift 10%, scale 0.85-1.15) on the student's input; the target follows the geometry",
    ),
    InvarianceRecipe(
        name="pilot-p1",
        tone_ops=("AutoContrast", "ContrastIncreasing"),
        tone_spec="rand-n1-m9-mstd0.5-inc1-mmax10",
        affine_prob=0.25, max_rotate=10.0, max_shift=0.06, scale=(0.9, 1.1),
        trained_shifts=("digital", "geometric"), about="pilot",
    ),
    InvarianceRecipe(
        name="pilot-p2",
        tone_ops=("AutoContrast", "ContrastIncreasing"),
        tone_spec="rand-n1-m9-mstd0.5-inc1-mmax10",
        affine_prob=0.0, max_rotate=0.0, max_shift=0.0, scale=(1.0, 1.0),
        trained_shifts=("digital",), about="pilot",
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
