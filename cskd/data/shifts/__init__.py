"""Distribution shifts that real traffic brings, as a registry: ImageNet-C's 15 common corruptions
(four families) and three geometric shifts, each at severities 1-5.

``apply_shift(images, name, severity, seed)`` takes and returns uint8 ``[N, C, H, W]`` at the
model's input size, before any model's own preprocessing: the same shifted pixels for every model
that is compared on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from cskd.data.shifts import corruptions as c
from cskd.data.shifts import geometric as g
from cskd.errors import CSKDError

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Shift:
    name: str
    family: str  # noise, blur, weather, digital (ImageNet-C's) or geometric
    fn: Callable[[np.ndarray, np.random.Generator, int], np.ndarray]

    @property
    def corruption(self) -> bool:
        """One of ImageNet-C's 15: what mean corruption accuracy and mCE average over."""
        return self.family != "geometric"


_SHIFTS: List[Shift] = [
    Shift("gaussian_noise", "noise", c.gaussian_noise), Shift("shot_noise", "noise", c.shot_noise),
    Shift("impulse_noise", "noise", c.impulse_noise),
    Shift("defocus_blur", "blur", c.defocus_blur), Shift("glass_blur", "blur", c.glass_blur),
    Shift("motion_blur", "blur", c.motion_blur), Shift("zoom_blur", "blur", c.zoom_blur),
    Shift("snow", "weather", c.snow), Shift("frost", "weather", c.frost), Shift("fog", "weather", c.fog),
    Shift("brightness", "weather", c.brightness),
    Shift("contrast", "digital", c.contrast), Shift("elastic_transform", "digital", c.elastic_transform),
    Shift("pixelate", "digital", c.pixelate), Shift("jpeg_compression", "digital", c.jpeg_compression),
    Shift("translate", "geometric", g.translate), Shift("rotate", "geometric", g.rotate), Shift("scale", "geometric", g.scale),
]
SHIFTS: Dict[str, Shift] = {s.name: s for s in _SHIFTS}
FAMILIES = tuple(dict.fromkeys(s.family for s in _SHIFTS))


def list_shifts(families: Optional[Iterable[str]] = None) -> List[Shift]:
    """Every shift, or those of ``families`` (in the registry's order)."""
    if families is None:
        return list(_SHIFTS)
    wanted = check_families(families)
    return [s for s in _SHIFTS if s.family in wanted]


def check_families(families: Iterable[str]) -> List[str]:
    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise CSKDError(f"unknown shift families {unknown}; choose from {list(FAMILIES)}")
    return families


def apply_shift(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (uint8 ``[N, C, H, W]``) under shift ``name`` at ``severity``; the same seed, the same pixels."""
    if name not in SHIFTS:
        raise CSKDError(f"unknown shift {name!r}; choose from {sorted(SHIFTS)}")
    if severity not in SEVERITIES:
        raise CSKDError(f"severity {severity} is not one of {list(SEVERITIES)}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CSKDError(f"shifts take uint8 [N, C, H, W] images, got {images.dtype} of shape {images.shape}")
    rng = np.random.default_rng([seed, list(SHIFTS).index(name), severity])
    shifted = SHIFTS[name].fn(images.astype(np.float32) / 255, rng, severity)
    return (np.clip(shifted, 0, 1) * 255).astype(np.uint8)  # truncated to 8 bits, as the benchmark saves its images
