"""The shift registry against the benchmark's formulas, worked by hand on images whose answer is known."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cskd.data.shifts import FAMILIES, SHIFTS, apply_shift, list_shifts
from cskd.data.shifts import corruptions as c
from cskd.data.shifts import geometric as g
from cskd.data.shifts.textures import frost_texture, plasma_fractal
from cskd.errors import CSKDError


def photos(n=6, channels=1, size=32, seed=0) -> np.ndarray:
    """Smooth random images (gradients and blobs) as uint8 [N, C, H, W]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = [np.stack([np.clip(0.5 + 0.4 * np.sin(6 * rng.random() * xx + 6 * rng.random() * yy + k), 0, 1) for k in range(channels)])
           for _ in range(n)]
    return (np.stack(out) * 255).astype(np.uint8)


def dot(size=32, y=16, x=16) -> np.ndarray:
    image = np.zeros((1, 1, size, size), dtype=np.uint8)
    image[0, 0, y - 1 : y + 1, x - 1 : x + 1] = 255
    return image


def centroid(image: np.ndarray) -> np.ndarray:
    weights = image[0, 0].astype(float)
    yy, xx = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    return np.array([(yy * weights).sum(), (xx * weights).sum()]) / weights.sum()


def test_the_registry_holds_imagenet_c_fifteen_in_four_families_and_three_geometric_shifts():
    assert FAMILIES == ("noise", "blur", "weather", "digital", "geometric")
    assert sum(s.corruption for s in SHIFTS.values()) == 15
    assert [s.name for s in list_shifts(["noise"])] == ["gaussian_noise", "shot_noise", "impulse_noise"]
    with pytest.raises(CSKDError, match="unknown shift families"):
        list_shifts(["rain"])


@pytest.mark.parametrize("name", sorted(SHIFTS))
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 28), (3, 40)])
def test_every_shift_keeps_shape_and_type_and_the_same_seed_gives_the_same_pixels(name, channels, size):
    images = photos(3, channels, size)
    first = apply_shift(images, name, 3, seed=1)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, apply_shift(images, name, 3, seed=1))
    assert not np.array_equal(first, images)  # severity 3 changes something everywhere


def test_contrast_is_the_formula_by_hand():
    images = photos(4, 3)
    x = images.astype(np.float64) / 255
    mean = x.mean(axis=(2, 3), keepdims=True)
    expected = np.clip((x - mean) * 0.15 + mean, 0, 1)  # severity 5
    assert np.abs(apply_shift(images, "contrast", 5).astype(float) / 255 - expected).max() <= 1 / 255 + 1e-6


def test_brightness_adds_to_the_hsv_value_and_keeps_hue_and_saturation():
    grey = photos(2, 1)
    expected = np.clip(grey / 255 + 0.3, 0, 1)
    assert np.abs(apply_shift(grey, "brightness", 5) / 255 - expected).max() <= 1 / 255 + 1e-6
    pixel = np.array([0.2, 0.4, 0.1])  # hue 105 degrees, saturation 0.75, value 0.4
    out = c.brightness(pixel.reshape(1, 3, 1, 1), None, 3).ravel()  # value + 0.15
    assert out.max() == pytest.approx(0.55) and (out.max() - out.min()) / out.max() == pytest.approx(0.75)
    assert out / out.max() == pytest.approx(pixel / pixel.max())


def test_noises_have_the_benchmarks_statistics():
    grey = np.full((40, 1, 32, 32), 128, dtype=np.uint8)
    x = grey / 255
    gaussian = apply_shift(grey, "gaussian_noise", 5) / 255 - x
    assert gaussian.std() == pytest.approx(0.10, rel=0.05)
    shot = apply_shift(grey, "shot_noise", 5) / 255  # Poisson(x c) / c: variance x / c at c = 50
    assert shot.var() == pytest.approx(x.mean() / 50, rel=0.1)
    impulse = apply_shift(grey, "impulse_noise", 5)
    assert (impulse != 128).mean() == pytest.approx(0.07, abs=0.006)
    assert set(np.unique(impulse[impulse != 128])) == {0, 255} and (impulse == 255).sum() == pytest.approx((impulse == 0).sum(), rel=0.15)


def test_blur_kernels_are_the_benchmarks_and_a_flat_image_stays_flat():
    kernel = c.disk_kernel(1.5, 0.1)
    assert kernel.shape == (17, 17) and kernel.sum() == pytest.approx(1) and np.allclose(kernel, kernel.T)
    assert np.allclose(kernel, kernel[::-1, ::-1])
    assert c.motion_kernel(10, 2) == pytest.approx(np.exp(-np.arange(21) ** 2 / 8) / np.exp(-np.arange(21) ** 2 / 8).sum())
    flat = np.full((2, 1, 32, 32), 100, dtype=np.uint8)
    for name in ("defocus_blur", "motion_blur", "zoom_blur", "pixelate"):
        assert np.abs(apply_shift(flat, name, 5).astype(int) - 100).max() <= 1, name


def test_glass_blur_at_severity_1_only_moves_pixels():
    images = photos(3)  # sigma 0.05: the Gaussians are the identity, so the swaps are a permutation
    out = apply_shift(images, "glass_blur", 1)
    assert not np.array_equal(out, images)
    assert all(np.array_equal(np.sort(a.ravel()), np.sort(b.ravel())) for a, b in zip(out, images))


def test_pixelate_and_jpeg_are_pils_round_trips():
    images = photos(2)
    pil = Image.fromarray(images[1, 0])
    boxed = np.asarray(pil.resize((20, 20), Image.BOX).resize((32, 32), Image.BOX))  # severity 5: 0.65 x 32 -> 20
    assert np.array_equal(apply_shift(images, "pixelate", 5)[1, 0], boxed)
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=40)
    assert np.array_equal(apply_shift(images, "jpeg_compression", 5)[1, 0], np.asarray(Image.open(buffer)))


def test_severity_makes_each_deterministic_shift_worse():
    images = photos(8, 3)
    for name in ("contrast", "brightness", "gaussian_noise", "defocus_blur", "pixelate", "fog"):  # zoom blur: its mean of zooms is not
        change = [np.abs(apply_shift(images, name, s).astype(int) - images).mean() for s in range(1, 6)]
        assert change == sorted(change), (name, change)


def test_geometric_shifts_move_a_dot_by_their_severitys_amount():
    image = dot(y=16, x=10)  # a dot 6 px left of the centre (15.5, 15.5)
    moved = centroid(apply_shift(image, "translate", 5)) - centroid(image)
    assert np.hypot(*moved) == pytest.approx(0.15 * 32, abs=0.3)
    start = centroid(image) - 15.5
    turned = centroid(apply_shift(image, "rotate", 4)) - 15.5
    angle = np.degrees(np.arctan2(turned[0], turned[1]) - np.arctan2(start[0], start[1]))
    assert abs((angle + 180) % 360 - 180) == pytest.approx(20, abs=2) and np.hypot(*turned) == pytest.approx(np.hypot(*start), abs=0.3)
    scaled = centroid(apply_shift(image, "scale", 5)) - 15.5
    assert np.hypot(*scaled) / np.hypot(*start) == pytest.approx(1 + g.SCALE[4], abs=0.03) or \
        np.hypot(*scaled) / np.hypot(*start) == pytest.approx(1 - g.SCALE[4], abs=0.03)


def test_textures_span_zero_to_one():
    fractal = plasma_fractal(np.random.default_rng(0), 3, 40, 2.0)
    assert fractal.shape == (3, 40, 40) and fractal.min(axis=(1, 2)) == pytest.approx(0) and fractal.max(axis=(1, 2)) == pytest.approx(1)
    frost = frost_texture(96)
    assert frost.max() == pytest.approx(1) and 0.2 < frost.mean() < 0.6


@pytest.mark.parametrize("images,name,severity,match", [
    (np.zeros((1, 1, 8, 8), np.float32), "contrast", 1, "uint8"), (np.zeros((1, 1, 8, 8), np.uint8), "rain", 1, "unknown shift"),
    (np.zeros((1, 1, 8, 8), np.uint8), "contrast", 6, "severity 6")])
def test_bad_requests_are_refused_by_name(images, name, severity, match):
    with pytest.raises(CSKDError, match=match):
        apply_shift(images, name, severity)
