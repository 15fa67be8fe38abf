"""What the routes share: the loaded model, its batcher, settings and metrics (``app.state.serving``)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from fastapi import Request

from cskd.runtime.package import ModelPackage
from cskd.runtime.preprocess import ImageDecodeError, decode_image, to_engine_input
from cskd.serve.batcher import DeadlineExceeded, DynamicBatcher, InferenceTimeout, Prepare, QueueFull
from cskd.serve.errors import APIError, bad_image, overloaded, timed_out
from cskd.serve.metrics import ServeMetrics
from cskd.serve.security import check_api_key
from cskd.serve.settings import ServeSettings


@dataclass
class Serving:
    settings: ServeSettings
    metrics: ServeMetrics
    package: Optional[ModelPackage] = None
    batcher: Optional[DynamicBatcher] = None
    backend_name: str = ""
    max_batch: int = 0  # the effective batch limit (settings, capped by the engine's own)
    ready: bool = False

    @property
    def serviceable(self) -> bool:
        """Loaded, warmed up, and its backend is not stuck on a call (readiness probes read this)."""
        return self.ready and not self.batcher.stalled

    @property
    def model_name(self) -> str:
        return self.package.name if self.package else ""

    def engine_rows(self, images: List[bytes]) -> np.ndarray:
        """Encoded images -> engine input (runs in the batcher's worker thread, never on the event loop)."""
        spec = self.package.input
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_image(data, spec.channels, spec.size, spec.resize, self.settings.max_pixels, spec.crop_pct))
            except ImageDecodeError as exc:
                raise bad_image(f"image {i}: {exc}" if len(images) > 1 else str(exc)) from None
        return to_engine_input(np.stack(decoded), spec.dtype, spec.mean, spec.std)

    async def classify(self, images: List[bytes]) -> np.ndarray:
        """Logits for encoded images: decoded and run with other requests' images in one batch."""
        return await self._submit(images, len(images), self.engine_rows)

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Logits for engine-ready rows, through the dynamic batcher."""
        return await self._submit(rows, len(rows), None)

    async def _submit(self, payload, count: int, prepare: Optional[Prepare]) -> np.ndarray:
        try:
            logits = await self.batcher.submit(payload, self.settings.request_timeout_s, count, prepare)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc(count)
            raise overloaded(f"server overloaded: {exc}; retry shortly") from None
        except DeadlineExceeded as exc:
            self.metrics.rejected.labels("deadline").inc(count)
            raise overloaded(f"request timed out in the queue ({exc}); retry shortly") from None
        except InferenceTimeout as exc:
            self.metrics.rejected.labels("timeout").inc(count)
            raise timed_out(f"{exc}; the backend may be stuck (GET /readyz says)") from None
        except APIError as exc:
            if exc.code == "bad_image":
                self.metrics.rejected.labels("bad_image").inc(count)
            raise
        self.metrics.images.inc(count)
        return logits


def admitted(serving: Serving, authorization: str) -> Serving:
    """``serving``, once the caller's ``Authorization`` value carries the key (if one is set) and the
    model is ready: the check every inference entry (HTTP inference routes, gRPC model RPCs) makes first."""
    check_api_key(serving.settings.api_key, authorization)
    return _ready(serving)


def serving_for(request: Request) -> Serving:
    """The app's serving state, admitted for this request: what the inference routes call first (they
    are answered by ``InferenceLane``, without FastAPI's dependency machinery; see ``app.py``)."""
    return admitted(request.app.state.serving, request.headers.get("authorization", ""))


async def get_serving(request: Request) -> Serving:
    """Dependency: the app's shared serving state (async: a plain ``def`` dependency costs a thread hop per request)."""
    return _ready(request.app.state.serving)


def _ready(serving: Serving) -> Serving:
    if not serving.ready:
        raise APIError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "1"})
    return serving


def decode_base64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_image(f"images[{index}] is not valid base64") from None
