"""Decode client images into the engine's input, as ``model.json`` describes it (no torch).

Pillow decodes with a pixel limit (decompression bombs), EXIF orientation is applied, the image is
converted to the model's channels, its shorter side resized to ``size / crop_pct`` and the centre
``size`` x ``size`` cropped: timm's evaluation transform, the one validation accuracy was measured
with. The result is uint8 ``[C, H, W]``; :func:`to_engine_input` turns a batch into what the graph
takes (raw uint8, or float32 normalised with the package's mean and std).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from cskd.errors import CSKDError

MAX_PIXELS = 40_000_000  # about 6300 x 6300: far above any photo, far below a bomb
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


class ImageDecodeError(CSKDError):
    """The bytes are not a decodable image (or exceed the pixel limit)."""


def resize_and_crop(image: Image.Image, size: int, resize: str = "bicubic", crop_pct: float = 1.0,
                    max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Shorter side to ``floor(size / crop_pct)`` (aspect kept), then the centre ``size`` x ``size``:
    torchvision's ``Resize(int)`` and ``CenterCrop`` as timm's eval transform chains them."""
    width, height = image.size
    short_target = math.floor(size / crop_pct)
    if width <= height:
        target = (short_target, int(short_target * height / width))
    else:
        target = (int(short_target * width / height), short_target)
    if target[0] * target[1] > max_pixels:  # a 1 x 40000 strip would become gigapixels before the crop
        raise ImageDecodeError(f"an image of {width}x{height} pixels is too elongated to resize (aspect ratio "
                               f"{max(width, height) / min(width, height):.0f}:1); send a less elongated image")
    if target != (width, height):
        image = image.resize(target, _RESAMPLE.get(resize, Image.BICUBIC))
        width, height = target
    if (width, height) == (size, size):
        return image
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def decode_image(data: bytes, channels: int, size: int, resize: str = "bicubic", max_pixels: int = MAX_PIXELS,
                 crop_pct: float = 1.0) -> np.ndarray:
    """Bytes of a PNG/JPEG/... file -> uint8 ``[channels, size, size]``."""
    if not data:
        raise ImageDecodeError("empty image: the request carried no bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            image = to_8_bit(ImageOps.exif_transpose(image))
            image = resize_and_crop(image.convert("L" if channels == 1 else "RGB"), size, resize, crop_pct, max_pixels)
            array = np.asarray(image, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged files (OSError, SyntaxError, struct.error...)
        raise ImageDecodeError(f"cannot decode the image ({type(exc).__name__}: {exc}); send a PNG, JPEG, BMP, GIF or "
                               "WebP file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_for(spec, data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of an image file -> uint8 ``[C, H, W]`` pixels the way the package of input spec ``spec``
    (:class:`~cskd.runtime.package.InputSpec`) expects them: its channels, size, resize and crop."""
    return decode_image(data, spec.channels, spec.size, spec.resize, max_pixels, spec.crop_pct)


def image_rows(images: Sequence[bytes], spec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image files -> the engine input of the package of input spec ``spec``: the one way the server's
    routes and its shadow teacher turn bytes into rows (``cskd predict`` decodes with :func:`decode_for`
    and encodes per engine batch). A bad image raises
    :class:`ImageDecodeError` naming its index among several."""
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_for(spec, data, max_pixels))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"image {i}: {exc}" if len(images) > 1 else str(exc)) from None
    return to_engine_input(np.stack(decoded), spec.dtype, spec.mean, spec.std)


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale images scaled to 8 bits (Pillow's own conversion would clip them)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":  # floating point: assume [0, 1] when it fits there, else [0, 255]
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8), mode="L")
    return image


def to_engine_input(batch: np.ndarray, dtype: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> the graph's input: unchanged for uint8 graphs, else normalised float32."""
    if dtype == "uint8":
        return np.ascontiguousarray(batch, dtype=np.uint8)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((batch.astype(np.float32) / 255.0 - mean_a) / std_a, dtype=np.float32)


def to_pixels(batch: np.ndarray, dtype: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`to_engine_input`: engine input ``[N, C, H, W]`` -> uint8 pixels (rounded, clipped)."""
    if dtype == "uint8":
        return np.ascontiguousarray(batch, dtype=np.uint8)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.round((batch.astype(np.float32) * std_a + mean_a) * 255.0), 0, 255).astype(np.uint8)


def conversion_problem(source, target) -> str:
    """Why engine inputs of ``source``'s spec cannot be turned into ``target``'s (empty: they can). Both are
    :class:`~cskd.runtime.package.InputSpec`. Pixels are recovered from the source's encoding, so the
    channels may go 1 -> 3 (repeated) or 3 -> 1 (luma) and the size may change (resized); what the
    source's crop cut away cannot come back, so the two crops must agree."""
    if source.layout != target.layout:
        return f"the layouts differ ({source.layout} against {target.layout})"
    if abs(source.crop_pct - target.crop_pct) > 1e-6:
        return (f"the student's input is a centre crop of {source.crop_pct:g} of the image and the teacher's of "
                f"{target.crop_pct:g}: what one crop cut away cannot be restored for the other")
    return ""


def convert_engine_input(batch: np.ndarray, source, target) -> np.ndarray:
    """Engine input of ``source``'s spec -> the same images as ``target``'s engine expects them: pixels
    recovered, channels matched, resized with the target's interpolation, then encoded the target's way."""
    pixels = to_pixels(batch, source.dtype, source.mean, source.std)
    if pixels.shape[1] != target.channels:
        mode = "L" if source.channels == 1 else "RGB"
        converted = [np.asarray(Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode=mode)
                                .convert("L" if target.channels == 1 else "RGB")) for image in pixels]
        pixels = np.stack([c[None] if target.channels == 1 else c.transpose(2, 0, 1) for c in converted])
    if pixels.shape[2:] != (target.size, target.size):
        resample = _RESAMPLE.get(target.resize, Image.BICUBIC)
        pixels = np.stack([np.stack([np.asarray(Image.fromarray(channel).resize((target.size, target.size), resample))
                                     for channel in image]) for image in pixels])
    return to_engine_input(pixels, target.dtype, target.mean, target.std)
