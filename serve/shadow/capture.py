"""Disagreeing inputs written as a transfer set: image files with one JSON line each in ``index.jsonl``.

Every writer (each server process, each replica on a shared volume) takes the folder's lock, counts
what the folder holds under it and writes only within the bounds: the bounds hold for all writers
together. An image and its index line exist together or not at all: the image is written to a
temporary name and renamed, then its line appended; a failure at any step removes what that write
made. The folder holds users' images: it and its files are the server's user's only (0700, 0600).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

import numpy as np
from PIL import Image

from cskd.errors import CSKDError
from cskd.runtime.package import InputSpec
from cskd.runtime.preprocess import to_pixels

logger = logging.getLogger("cskd.serve.shadow")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_MODE, FILE_MODE = 0o700, 0o600


class DisagreementCapture:
    """At most ``max_images`` files and ``max_bytes`` in ``folder``, counting every writer's and what an
    earlier run left there."""

    INDEX = "index.jsonl"
    LOCK = ".capture.lock"

    def __init__(self, folder: str | Path, max_images: int, max_bytes: int) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            with self._locked():
                pass
        except OSError as exc:
            raise CSKDError(f"--shadow-capture {folder}: cannot write there ({exc.strerror}); choose a writable folder") from None
        if self.folder.stat().st_mode & 0o077:
            logger.warning("shadow capture: %s is readable by other users (mode %o); it will hold users' images: "
                           "chmod 700 it unless that is meant", self.folder, self.folder.stat().st_mode & 0o777)
        self.max_images, self.max_bytes = max_images, max_bytes
        self.images, self.bytes = self._held()
        self._sequence = 0
        # unique across writers: replicas in containers may all be pid 1 on one shared volume
        self._writer = f"{os.getpid()}-{secrets.token_hex(3)}"

    @property
    def full(self) -> bool:
        return self.images >= self.max_images or self.bytes >= self.max_bytes

    @contextmanager
    def _locked(self) -> Iterator[None]:
        descriptor = os.open(self.folder / self.LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _held(self) -> Tuple[int, int]:
        """Images and bytes in the folder now (every writer's)."""
        images = total = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.startswith(".") and entry.is_file():
                    images += 1
                    total += entry.stat().st_size
        return images, total

    def write(self, image: bytes, suffix: str, record: Dict[str, Any]) -> str:
        """Store one image and its index line: ``"written"``, ``"full"`` (a bound is reached) or ``"failed"``."""
        try:
            with self._locked():
                self.images, self.bytes = self._held()
                if self.full or self.bytes + len(image) > self.max_bytes:
                    return "full"
                self._sequence += 1
                name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(record['time']))}-{self._writer}-{self._sequence:06d}{suffix}"
                self._write_pair(name, image, json.dumps({**record, "file": name}, separators=(",", ":")) + "\n")
        except OSError as exc:
            logger.warning("shadow capture: cannot write into %s (%s)", self.folder, exc.strerror or exc)
            return "failed"
        self.images += 1
        self.bytes += len(image)
        return "written"

    def _write_pair(self, name: str, image: bytes, line: str) -> None:
        """The image under ``name`` and its index line, both or neither (raises OSError after cleaning up)."""
        temporary, final, index = self.folder / f".{name}.tmp", self.folder / name, self.folder / self.INDEX
        try:
            write_private(temporary, image)
            os.replace(temporary, final)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        descriptor = None
        try:
            descriptor = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            size = os.fstat(descriptor).st_size
            try:
                data = line.encode()
                if os.write(descriptor, data) != len(data):
                    raise OSError(28, "short write to the index")
            except OSError:
                os.ftruncate(descriptor, size)  # no half line for the next reader
                raise
        except OSError:
            final.unlink(missing_ok=True)
            raise
        finally:
            if descriptor is not None:
                os.close(descriptor)

    def report(self) -> Dict[str, Any]:
        return {"folder": str(self.folder), "images": self.images, "bytes": self.bytes, "max_images": self.max_images,
                "max_bytes": self.max_bytes, "full": self.full}


def write_private(path: Path, data: bytes) -> None:
    """``data`` into a new file only the server's user can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    finally:
        os.close(descriptor)


def image_file(payload: Union[bytes, np.ndarray], spec: InputSpec) -> Tuple[bytes, str]:
    """A sample as an image file: the client's own bytes when they are a PNG or JPEG, else a PNG of the
    pixels (a v2 tensor is turned back into pixels with the student's mean and std)."""
    if isinstance(payload, bytes):
        if payload[:8] == b"\x89PNG\r\n\x1a\n":
            return payload, ".png"
        if payload[:3] == b"\xff\xd8\xff":
            return payload, ".jpg"
        with Image.open(io.BytesIO(payload)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue(), ".png"
    pixels = to_pixels(payload[None], spec.dtype, spec.mean, spec.std)[0]
    image = Image.fromarray(pixels[0], mode="L") if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"
