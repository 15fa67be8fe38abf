"""The frames between the serving workers and the shadow process, over one Unix socket per worker.

A frame is ``total length (4 bytes, big-endian) | header length (4 bytes) | JSON header | payload``:
a worker sends one per sampled image (the header says what the payload is: the client's encoded image
or an engine row, its dtype and shape, the student's logits, and how many samples the worker dropped
since its last frame); the shadow process answers with report frames (a JSON header, no payload).
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, Iterator, Tuple

_LENGTHS = struct.Struct(">II")
MAX_FRAME = 1 << 30  # a frame is at most a request body (the server's --max-body-bytes) and its header


class FrameError(ValueError):
    """Bytes that are not a frame: the peer is not a cskd shadow, or a bug."""


def encode_frame(header: Dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTHS.pack(len(head) + len(payload), len(head)) + head + payload


class FrameReader:
    """Frames out of a byte stream that arrives in pieces of any size."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Tuple[Dict[str, Any], bytes]]:
        self._buffer += data
        while len(self._buffer) >= _LENGTHS.size:
            total, head = _LENGTHS.unpack_from(self._buffer)
            if total > MAX_FRAME or head > total:
                raise FrameError(f"a frame of {total} bytes with a header of {head}")
            end = _LENGTHS.size + total
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[_LENGTHS.size:end])
            del self._buffer[:end]
            try:
                header = json.loads(frame[:head])
            except ValueError as exc:
                raise FrameError(f"a frame header that is not JSON ({exc})") from None
            yield header, frame[head:]

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)
