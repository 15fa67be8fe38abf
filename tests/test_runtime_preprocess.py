"""Serving-side preprocessing (no torch) equals the evaluation transform accuracy was measured with."""

from __future__ import annotations

import base64
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


# A JPEG rotated by EXIF whose EXIF has one tag of the wrong type: Pillow's exif_transpose raises
# struct.error on it (found by fuzzing the decoder).
BAD_EXIF_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/4QBYRXhpZgAATU0AKgAAAAgAAwEDAAIAAAAEY2FtAAESAAMAAAABAAYAAIdpAAQAAAABAAAAMgAAAAAAAZADAAIAAAALAAAARAAAAAAyMDIwOjAxOjAxCAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/wAARCAAEAAgDASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwD5/ooooA//2Q==")


def test_damaged_exif_is_a_bad_image_not_a_crash():
    with pytest.raises(ImageDecodeError, match="cannot decode the image"):
        decode_image(BAD_EXIF_JPEG, 3, 32)


def test_an_extremely_elongated_image_is_refused_before_the_resize():
    strip = png(np.zeros((1, 40000), dtype=np.uint8))  # 240 bytes; resized it would be 32 x 1,280,000 pixels
    with pytest.raises(ImageDecodeError, match="too elongated to resize \\(aspect ratio 40000:1\\)"):
        decode_image(strip, 1, 32, max_pixels=1_000_000)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped():
    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")  # uint16: mode I;16
    served = decode_image(buf.getvalue(), 1, 32)[0]
    assert np.abs(served.astype(int) - np.round(gradient / 257.0)).max() <= 1
    assert len(np.unique(served)) > 200  # a clipped image would hold two values


def spec(**fields):
    from cskd.runtime.package import InputSpec

    values = dict(name="input", dtype="float32", layout="NCHW", channels=1, size=32, mean=[0.286], std=[0.353])
    return InputSpec(**{**values, **fields})


def test_pixels_come_back_exactly_from_a_float_or_uint8_engine_input():
    from cskd.runtime.preprocess import to_pixels

    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    for dtype in ("float32", "uint8"):
        encoded = to_engine_input(pixels, dtype, [0.1, 0.5, 0.9], [0.2, 0.3, 0.4])
        assert np.array_equal(to_pixels(encoded, dtype, [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]), pixels)


def test_an_engine_input_converts_to_another_spec_as_pil_would_make_it():
    from cskd.runtime.preprocess import convert_engine_input

    gray = np.random.default_rng(1).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)
    source = spec()
    target = spec(channels=3, size=48, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], resize="bilinear")
    converted = convert_engine_input(to_engine_input(gray, "float32", source.mean, source.std), source, target)
    expected = np.stack([np.asarray(Image.fromarray(g[0], mode="L").convert("RGB").resize((48, 48), Image.BILINEAR))
                         .transpose(2, 0, 1) for g in gray])  # the reference: PIL on the pixels themselves
    assert converted.shape == (2, 3, 48, 48)
    assert np.allclose(converted, to_engine_input(expected, "float32", target.mean, target.std), atol=1e-5)
    back_to_gray = convert_engine_input(converted, target, spec(dtype="uint8"))  # 3 -> 1 by PIL's luma, then raw pixels
    assert back_to_gray.dtype == np.uint8 and back_to_gray.shape == (2, 1, 32, 32)


def test_inputs_of_other_crops_cannot_be_converted():
    from cskd.runtime.preprocess import conversion_problem

    assert conversion_problem(spec(), spec(channels=3, size=224)) == ""
    assert "cannot be restored" in conversion_problem(spec(), spec(crop_pct=0.875))


def test_image_rows_are_the_packages_own_decode_and_encoding_and_name_a_bad_image():
    from cskd.runtime.package import InputSpec
    from cskd.runtime.preprocess import image_rows

    spec = InputSpec("input", "float32", "NCHW", 1, 16, [0.5], [0.25], "bilinear", 0.875)
    arrays = [np.random.default_rng(k).integers(0, 256, (30, 40), dtype=np.uint8) for k in range(2)]
    rows = image_rows([png(a) for a in arrays], spec)
    # by hand: shorter side 30 -> 16 / 0.875 = 18 (timm's floor), the centre 16 x 16, then (x / 255 - 0.5) / 0.25
    for a, row in zip(arrays, rows):
        resized = Image.fromarray(a).resize((24, 18), Image.BILINEAR)
        crop = np.asarray(resized)[1:17, 4:20].astype(np.float32)
        assert np.abs(row[0] - (crop / 255 - 0.5) / 0.25).max() < 1e-5
    with pytest.raises(ImageDecodeError, match="image 1: cannot decode"):
        image_rows([png(arrays[0]), b"not an image"], spec)
    with pytest.raises(ImageDecodeError, match="^empty image"):
        image_rows([b""], spec)
