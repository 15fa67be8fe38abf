"""Random textures the weather corruptions lay over an image: fog's plasma fractal and a frost layer."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def plasma_fractal(rng: np.random.Generator, count: int, size: int, decay: float) -> np.ndarray:
    """``count`` diamond-square fractals, ``[count, size, size]`` in [0, 1] (ImageNet-C's fog layer).

    The grid is built at the next power of two and cropped. Each level halves the step; a new point is
    the mean of its four neighbours (wrapping around) plus uniform noise of amplitude ``wibble**2``,
    where ``wibble`` starts at 100 and is divided by ``decay`` per level: a larger decay gives a
    smoother fog."""
    side = 1 << max(1, (size - 1).bit_length())
    grid = np.zeros((count, side, side), dtype=np.float64)
    step, wibble = side, 100.0

    def jittered(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        grid[:, half::step, half::step] = jittered(square)  # square step: the centre of each cell
        centres = grid[:, half::step, half::step]
        corners = grid[:, ::step, ::step]
        grid[:, ::step, half::step] = jittered(centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2))
        grid[:, half::step, ::step] = jittered(centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1))
        step, wibble = half, wibble / decay
    grid = grid[:, :size, :size]
    low = grid.min(axis=(1, 2), keepdims=True)
    grid = grid - low
    return (grid / np.maximum(grid.max(axis=(1, 2), keepdims=True), 1e-12)).astype(np.float32)


def frost_texture(size: int = 160, seed: int = 7) -> np.ndarray:
    """A synthetic frost layer ``[size, size]`` in [0, 1]: branching ice needles, lightly blurred.

    ImageNet-C overlays crops of six photographs of frost; those photographs are not ours to ship,
    so this texture stands in for them (same role: bright, thin, branching structure over about a
    third of the area). Frost figures are therefore not comparable with published ImageNet-C frost
    numbers; every other corruption follows the benchmark's formulas."""
    rng = np.random.default_rng(seed)
    layer = np.zeros((size, size), dtype=np.float32)
    stack = [(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, 2 * np.pi), size / 6, 1.0) for _ in range(90)]
    while stack:
        y, x, angle, length, brightness = stack.pop()
        steps = int(length)
        ys = (y + np.sin(angle) * np.arange(steps)) % size
        xs = (x + np.cos(angle) * np.arange(steps)) % size
        np.maximum.at(layer, (ys.astype(int), xs.astype(int)), brightness)
        if length > 3:  # needles branch off at about 60 degrees, shorter and dimmer
            for k in range(2):
                at = rng.uniform(0.2, 0.9)
                turn = (1 if k else -1) * rng.uniform(0.8, 1.3)
                stack.append((y + np.sin(angle) * length * at, x + np.cos(angle) * length * at, angle + turn,
                              length * rng.uniform(0.4, 0.6), brightness * 0.9))
    layer = ndimage.gaussian_filter(layer, 0.7, mode="wrap") + 0.6 * ndimage.gaussian_filter(rng.random((size, size)), 3, mode="wrap")
    return (layer / layer.max()).astype(np.float32)
