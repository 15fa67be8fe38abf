"""What the routes share (``app.state.serving``): the served models, each with its engine, batcher and
limits, the settings, the metrics and, when asked for, the shadow teacher watching the first model."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
from fastapi import Request

from cskd.runtime.package import ModelPackage
from cskd.runtime.preprocess import ImageDecodeError, image_rows
from cskd.serve.batcher import DeadlineExceeded, DynamicBatcher, InferenceTimeout, Prepare, QueueFull
from cskd.serve.errors import APIError, bad_image, overloaded, timed_out
from cskd.serve.metrics import ServeMetrics
from cskd.serve.security import check_api_key
from cskd.serve.settings import ServeSettings

# Called with (payload, rows-or-images kind, logits) once a model has answered: how the shadow teacher
# sees the student's traffic (it must return at once; the teacher's work happens elsewhere).
AnswerHook = Callable[[object, bool, np.ndarray], None]


@dataclass
class ServedModel:
    """One model package on the server: its engine behind a dynamic batcher, its limits and metrics."""

    name: str
    package: ModelPackage
    settings: ServeSettings
    metrics: ServeMetrics
    batcher: DynamicBatcher
    backend_name: str
    max_batch: int  # the effective batch limit (settings, capped by the engine's own)
    on_answer: Optional[AnswerHook] = None

    @property
    def serviceable(self) -> bool:
        """Its backend is not stuck on a call (readiness probes read this)."""
        return not self.batcher.stalled

    def engine_rows(self, images: List[bytes]) -> np.ndarray:
        """Encoded images -> engine input (runs in the batcher's worker thread, never on the event loop)."""
        try:
            return image_rows(images, self.package.input, self.settings.max_pixels)
        except ImageDecodeError as exc:
            raise bad_image(str(exc)) from None

    async def classify(self, images: List[bytes]) -> np.ndarray:
        """Logits for encoded images: decoded and run with other requests' images in one batch."""
        logits = await self._submit(images, len(images), self.engine_rows)
        if self.on_answer is not None:
            self.on_answer(images, False, logits)
        return logits

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Logits for engine-ready rows, through the dynamic batcher."""
        logits = await self._submit(rows, len(rows), None)
        if self.on_answer is not None:
            self.on_answer(rows, True, logits)
        return logits

    async def _submit(self, payload, count: int, prepare: Optional[Prepare]) -> np.ndarray:
        rejected = self.metrics.rejected
        try:
            logits = await self.batcher.submit(payload, self.settings.request_timeout_s, count, prepare)
        except QueueFull as exc:
            rejected.labels(self.name, "queue_full").inc(count)
            raise overloaded(f"server overloaded: {exc}; retry shortly") from None
        except DeadlineExceeded as exc:
            rejected.labels(self.name, "deadline").inc(count)
            raise overloaded(f"request timed out in the queue ({exc}); retry shortly") from None
        except InferenceTimeout as exc:
            rejected.labels(self.name, "timeout").inc(count)
            raise timed_out(f"{exc}; the backend may be stuck (GET /readyz says)") from None
        except APIError as exc:
            if exc.code == "bad_image":
                rejected.labels(self.name, "bad_image").inc(count)
            raise
        self.metrics.images.labels(self.name).inc(count)
        return logits


@dataclass
class Serving:
    settings: ServeSettings
    metrics: ServeMetrics
    models: Dict[str, ServedModel] = field(default_factory=dict)  # in the order given: the first is the default
    ready: bool = False  # every model loaded and warmed up
    shadow: Optional[object] = None  # the ShadowFeed to the shadow process (serve/shadow/), when --shadow is on

    @property
    def default(self) -> ServedModel:
        """The model ``/predict`` answers with unless ``?model=`` names another: the first one given."""
        return next(iter(self.models.values()))

    @property
    def serviceable(self) -> bool:
        """Loaded, warmed up, and no model's backend is stuck on a call (readiness probes read this)."""
        return self.ready and all(model.serviceable for model in self.models.values())

    def model(self, name: Optional[str] = None) -> ServedModel:
        """The model called ``name`` (the default one for None); 404 for a name this server does not serve."""
        if name is None:
            return self.default
        if name not in self.models:
            raise APIError(404, "model_not_found", f"no model named {name!r}; this server serves "
                           f"{', '.join(repr(n) for n in self.models)}")
        return self.models[name]


def admitted(serving: Serving, authorization: str) -> Serving:
    """``serving``, once the caller's ``Authorization`` value carries the key (if one is set) and the
    models are ready: the check every inference entry (HTTP inference routes, gRPC model RPCs) makes first."""
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
