"""Serving-side preprocessing (no torch) equals the evaluation transform accuracy was measured with."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cskd.data.transforms import eval_transform
from cskd.runtime.preprocess import ImageDecodeError, decode_image, to_engine_input


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("width, height", [(28, 28), (40, 30), (30, 47), (300, 200)])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_decode_matches_timms_eval_transform(width, height, crop_pct):
    array = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    served = decode_image(png(array), 3, 32, "bicubic", crop_pct=crop_pct)
    evaluated = eval_transform(32, 3, "bicubic", crop_pct)(Image.fromarray(array)).numpy()
    assert served.shape == (3, 32, 32) and served.dtype == np.uint8
    assert np.abs(served.astype(np.float32) / 255 - evaluated).max() < 1e-6


def test_grayscale_model_takes_one_channel_of_a_colour_image():
    array = np.full((20, 20, 3), (200, 100, 50), dtype=np.uint8)
    served = decode_image(png(array), 1, 16)
    assert served.shape == (1, 16, 16) and served[0, 0, 0] == np.asarray(Image.fromarray(array).convert("L"))[0, 0]


def test_engine_input_is_normalised_float_or_raw_uint8():
    batch = np.full((2, 1, 4, 4), 255, dtype=np.uint8)
    assert np.allclose(to_engine_input(batch, "float32", [0.5], [0.25]), (1.0 - 0.5) / 0.25)
    assert to_engine_input(batch, "uint8", [0.5], [0.25]).dtype == np.uint8


def test_undecodable_bytes_are_a_clear_error():
    with pytest.raises(ImageDecodeError, match="cannot decode the image"):
        decode_image(b"not an image", 1, 32)
    with pytest.raises(ImageDecodeError, match="empty image"):
        decode_image(b"", 1, 32)
