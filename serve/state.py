"""What the routes share: the loaded model, its batcher, settings and metrics (``app.state.serving``)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from cskd.runtime.package import ModelPackage
from cskd.runtime.preprocess import ImageDecodeError, decode_image, to_engine_input
from cskd.serve.batcher import DeadlineExceeded, DynamicBatcher, QueueFull
from cskd.serve.errors import APIError, bad_image, overloaded
from cskd.serve.metrics import ServeMetrics
from cskd.serve.settings import ServeSettings


@dataclass
class Serving:
    settings: ServeSettings
    metrics: ServeMetrics
    package: Optional[ModelPackage] = None
    batcher: Optional[DynamicBatcher] = None
    backend_name: str = ""
    ready: bool = False

    @property
    def model_name(self) -> str:
        return self.package.name if self.package else ""

    async def decode(self, data: bytes) -> np.ndarray:
        """Bytes -> uint8 [C, H, W] in a worker thread (decoding is CPU work)."""
        spec = self.package.input
        try:
            return await run_in_threadpool(decode_image, data, spec.channels, spec.size, spec.resize, self.settings.max_pixels,
                                           spec.crop_pct)
        except ImageDecodeError as exc:
            self.metrics.rejected.labels("bad_image").inc()
            raise bad_image(str(exc)) from None

    def engine_input(self, images: List[np.ndarray]) -> np.ndarray:
        spec = self.package.input
        return to_engine_input(np.stack(images), spec.dtype, spec.mean, spec.std)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for engine-ready rows, through the dynamic batcher."""
        try:
            logits = await self.batcher.submit(batch, self.settings.request_timeout_s)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc(len(batch))
            raise overloaded(f"server overloaded: {exc}; retry shortly") from None
        except DeadlineExceeded as exc:
            self.metrics.rejected.labels("deadline").inc(len(batch))
            raise overloaded(f"request timed out in the queue ({exc}); retry shortly") from None
        self.metrics.images.inc(len(batch))
        return logits


def get_serving(request: Request) -> Serving:
    """Dependency: the app's shared serving state."""
    serving: Serving = request.app.state.serving
    if not serving.ready:
        raise APIError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "1"})
    return serving


def decode_base64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_image(f"images[{index}] is not valid base64") from None
