"""The 15 common corruptions of ImageNet-C (Hendrycks & Dietterich, 2019) at CIFAR-10-C's parameters.

Each function takes a batch of images as float32 ``[N, C, H, W]`` in [0, 1], a random generator and
a severity 1-5, and returns the corrupted batch in [0, 1]. The formulas are the benchmark's own
(its ``make_cifar_c.py``), written on numpy, scipy and PIL rather than on OpenCV, scikit-image and
ImageMagick: OpenCV's reflect-101 border is scipy's ``mirror``, scikit-image's ``gaussian`` is scipy's
``gaussian_filter``, and ImageMagick's motion blur is its one-sided Gaussian line kernel, laid out as
the maintained ``imagecorruptions`` package does without Wand. Sizes that CIFAR fixes at 32 px
(elastic displacements, the glass-blur loop) scale with the image, so any input size works; that is
where CIFAR-10-C corrupts, at the model's input size. Frost overlays a synthetic texture (see
:func:`~cskd.data.shifts.textures.frost_texture`).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from cskd.data.shifts.textures import frost_texture, plasma_fractal

# ---------------------------------------------------------------------------------------- helpers


def grey(x: np.ndarray) -> np.ndarray:
    """Luma ``[N, 1, H, W]`` (ITU-R 601, as OpenCV's RGB2GRAY); a grey image is its own."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def per_image(x: np.ndarray, fn) -> np.ndarray:
    """``fn`` applied to each ``[C, H, W]`` image of the batch."""
    return np.stack([fn(image) for image in x])


def as_pil(image: np.ndarray) -> Image.Image:
    """``[C, H, W]`` in [0, 1] as a PIL image (``L`` or ``RGB``), quantised as the benchmark saves it."""
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))


def from_pil(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32) / 255
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of ``[..., H, W]`` by ``factor`` (bilinear) and crop back to ``H x W``."""
    h = x.shape[-2]
    crop = int(math.ceil(h / factor))
    top = (h - crop) // 2
    zoomed = ndimage.zoom(x[..., top : top + crop, top : top + crop], (1,) * (x.ndim - 2) + (factor, factor), order=1)
    trim = (zoomed.shape[-2] - h) // 2
    return zoomed[..., trim : trim + h, trim : trim + h]


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """scikit-image's ``gaussian`` over the two spatial axes of ``[N, C, H, W]``."""
    return ndimage.gaussian_filter(x, (0, 0, sigma, sigma), mode=mode, truncate=truncate)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The benchmark's defocus kernel: a disk (17 x 17 for radii up to 8), normalised, then smoothed
    by a 3-tap Gaussian of ``alias_blur`` (OpenCV's GaussianBlur, reflect-101 border)."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    taps = 3 if radius <= 8 else 5
    coords = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(coords, coords)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    offsets = np.arange(taps) - taps // 2
    blur = np.exp(-(offsets**2) / (2 * alias_blur**2))
    blur /= blur.sum()
    disk = ndimage.correlate1d(disk, blur, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, blur, axis=1, mode="mirror")


def motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's motion-blur weights: a one-sided Gaussian over ``2 * radius + 1`` taps, normalised."""
    width = 2 * int(math.ceil(radius)) + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    return weights / weights.sum()


def shift_edge(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``[..., H, W]`` moved by whole pixels, the uncovered border repeating the nearest edge row or column."""
    h, w = image.shape[-2:]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[..., rows[:, None], cols[None, :]]


def motion_blur_one(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Blur ``[C, H, W]`` along ``angle`` degrees: the image is the weighted sum of copies moved back
    along the line, one whole pixel per tap, until a move would leave the image."""
    weights = motion_kernel(radius, sigma)
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    out = np.zeros_like(image, dtype=np.float32)
    for i, weight in enumerate(weights):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= image.shape[-2] or abs(dx) >= image.shape[-1]:
            break
        out += weight * shift_edge(image, dx, dy)
    return out


# ---------------------------------------------------------------------------------------- noise


def gaussian_noise(x, rng, severity):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return np.clip(x + rng.normal(0, c, x.shape), 0, 1)


def shot_noise(x, rng, severity):
    c = [500, 250, 100, 75, 50][severity - 1]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x, rng, severity):
    """Salt and pepper on each value alone (scikit-image's ``random_noise(mode="s&p")``)."""
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    flipped = rng.random(x.shape) <= amount
    salted = rng.random(x.shape) <= 0.5
    return np.where(flipped, salted.astype(x.dtype), x)


# ---------------------------------------------------------------------------------------- blur


def defocus_blur(x, rng, severity):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = disk_kernel(radius, alias)
    return np.clip(ndimage.correlate(x, kernel[None, None], mode="mirror"), 0, 1)


def glass_blur(x, rng, severity):
    """Blur, then swap each pixel with a random neighbour (bottom-right to top-left, in place), blur again."""
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    x = (gaussian(x, sigma) * 255).astype(np.uint8).astype(np.float32) / 255
    n, _, h, w = x.shape
    batch = np.arange(n)
    for _ in range(iterations):
        for row in range(h - delta, delta, -1):
            for col in range(w - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2, n))
                other = x[batch, :, row + dy, col + dx].copy()
                x[batch, :, row + dy, col + dx] = x[:, :, row, col]
                x[:, :, row, col] = other
    return np.clip(gaussian(x, sigma), 0, 1)


def motion_blur(x, rng, severity):
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][severity - 1]
    return np.clip(np.stack([motion_blur_one(image, radius, sigma, rng.uniform(-45, 45)) for image in x]), 0, 1)


def zoom_blur(x, rng, severity):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    zooms = np.arange(1, top, 0.01)
    out = x.copy()
    for zoom in zooms:
        out += clipped_zoom(x, zoom)
    return np.clip(out / (len(zooms) + 1), 0, 1)


# ---------------------------------------------------------------------------------------- weather


def snow(x, rng, severity):
    mean, std, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    n, _, h, w = x.shape
    flakes = clipped_zoom(rng.normal(mean, std, (n, 1, h, w)), zoom)
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255  # an 8-bit layer, as the benchmark blurs it
    flakes = np.stack([motion_blur_one(layer, radius, sigma, rng.uniform(-135, -45)) for layer in flakes])
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255
    x = blend * x + (1 - blend) * np.maximum(x, grey(x) * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2, axes=(2, 3)), 0, 1)


_FROST = {}


def frost(x, rng, severity):
    """The image dimmed and a random crop of the frost layer added (the layer a fifth of its size per
    CIFAR image side, as CIFAR-10-C shrinks its photographs, so the crystals keep their scale)."""
    keep, amount = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    n, c, h, w = x.shape
    side = max(160, 2 * max(h, w))
    if side not in _FROST:
        _FROST[side] = frost_texture(side)
    layer = _FROST[side]
    tint = np.array([0.9, 0.95, 1.0], dtype=np.float32)[:, None, None] if c == 3 else np.ones((c, 1, 1), np.float32)
    tops = rng.integers(0, side - h + 1, n)
    lefts = rng.integers(0, side - w + 1, n)
    crops = np.stack([layer[t : t + h, s : s + w] for t, s in zip(tops, lefts)])[:, None] * tint
    return np.clip(keep * x + amount * crops, 0, 1)


def fog(x, rng, severity):
    amount, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    n, _, h, w = x.shape
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + amount * plasma_fractal(rng, n, max(h, w), decay)[:, None, :h, :w]
    return np.clip(x * peak / (peak + amount), 0, 1)


def brightness(x, rng, severity):
    """HSV value + c (clipped), hue and saturation kept: every channel scales by the new value over the old."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    value = x.max(axis=1, keepdims=True)
    brighter = np.clip(value + c, 0, 1)
    return np.where(value > 0, x * brighter / np.maximum(value, 1e-12), brighter)


# ---------------------------------------------------------------------------------------- digital


def contrast(x, rng, severity):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(2, 3), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def affine_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix taking three ``(x, y)`` points to three others (OpenCV's getAffineTransform)."""
    return np.linalg.solve(np.hstack([source, np.ones((3, 1))]), target).T


def elastic_transform(x, rng, severity):
    """A random affine move of three points, then a smooth random displacement field (bilinear)."""
    n, c, h, w = x.shape
    size = 32 if (h, w) == (32, 32) else min(h, w)  # CIFAR-10-C states these as fractions of its 32 px
    alpha, sigma, affine = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)][severity - 1]
    alpha, sigma, affine = alpha * size, sigma * size, affine * size
    centre = np.float32([w, h]) // 2
    square = min(h, w) // 3
    source = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty_like(x)
    for i, image in enumerate(x):
        matrix = affine_matrix(source, source + rng.uniform(-affine, affine, source.shape).astype(np.float32))
        inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]  # a warp reads each output pixel at M^-1 (x, y)
        warped = np.stack([ndimage.map_coordinates(channel, [inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2],
                                                             inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]],
                                                   order=1, mode="mirror") for channel in image])
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
        out[i] = np.stack([ndimage.map_coordinates(channel, [yy + dy, xx + dx], order=1, mode="reflect") for channel in warped])
    return np.clip(out, 0, 1)


def pixelate(x, rng, severity):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]

    def one(image):
        pil = as_pil(image)
        small = pil.resize((int(pil.width * c), int(pil.height * c)), Image.BOX)
        return from_pil(small.resize(pil.size, Image.BOX))

    return per_image(x, one)


def jpeg_compression(x, rng, severity):
    quality = [80, 65, 58, 50, 40][severity - 1]

    def one(image):
        buffer = io.BytesIO()
        as_pil(image).save(buffer, "JPEG", quality=quality)
        return from_pil(Image.open(buffer))

    return per_image(x, one)
