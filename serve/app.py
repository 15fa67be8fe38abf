"""The FastAPI application: routers, lifespan (load, warm up, batch, drain), middleware.

    app = create_app("runs/demo/export-onnx-fp32", max_batch=16)
    uvicorn.run(app)                      # or: cskd serve runs/demo/export-onnx-fp32
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Tuple

import numpy as np
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import compile_path

from cskd import __version__
from cskd.runtime import cores
from cskd.runtime.backends import BackendOptions, create_backend
from cskd.runtime.package import NamedPackage, resolve_packages
from cskd.serve.batcher import DynamicBatcher
from cskd.serve.errors import APIError, error_response, install_handlers, response_for
from cskd.serve.metrics import create_metrics
from cskd.serve.parsing import parse_count
from cskd.serve.routers import docs, health, kserve, model, predict, shadow
from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.feed import ShadowCollector, ShadowFeed
from cskd.serve.shadow.judge import resolve_shadow
from cskd.serve.shadow.process import ShadowProcess
from cskd.serve.state import ServedModel, Serving

logger = logging.getLogger("cskd.serve")

SHADOW_CONNECT_S = 30.0  # a worker waits this long for the shadow's first report before serving without it


def engine_threads(requested: Optional[int], models: int, workers: int = 1) -> Optional[int]:
    """Each model's onnxruntime threads: ``--threads`` when given; else a lone model in a lone worker
    gets onnxruntime's default (every core) and otherwise every model of every worker its share of the
    usable cores (the affinity mask bounded by a container's CPU quota, :mod:`cskd.runtime.cores`), at
    least one each. Measured on the demo pair under load at once, sharing served the student 18% and
    the teacher 47% more than every model on every core, which oversubscribes (docs/benchmarks.md,
    "Several models per server"). Under a quota onnxruntime's default would count the host's cores."""
    if requested:
        return requested
    usable, engines = cores.usable_cores(), max(1, models) * max(1, workers)
    if engines == 1 and usable == cores.affinity_cores():
        return None
    return max(1, usable // engines)


def _load(entry: NamedPackage, serving: Serving, threads: Optional[int]) -> ServedModel:
    """One package's engine, warmed up at the batch sizes it will run, behind its own batcher (in a thread)."""
    settings, metrics = serving.settings, serving.metrics
    # No spinning: idle onnxruntime threads would otherwise burn the cores the event loop,
    # the decoders, the next batch and the other models need.
    options = BackendOptions(threads=threads, spin=False, providers=settings.providers)
    backend, package = create_backend(entry.folder, settings.backend, options)
    spec, max_batch = package.input, package.batch_limit(settings.max_batch)
    for batch in sorted({1, max_batch}):  # a first call per shape allocates and picks kernels
        backend.infer(np.zeros((batch, spec.channels, spec.size, spec.size), dtype=np.uint8 if spec.dtype == "uint8" else np.float32))
    batch_size, seconds = metrics.batch_size.labels(entry.name), metrics.inference_seconds.labels(entry.name)
    batcher = DynamicBatcher(backend.infer, max_batch, settings.max_wait_ms, settings.max_queue,
                             on_batch=lambda size, took: (batch_size.observe(size), seconds.observe(took)),
                             on_queue=metrics.queue_depth.labels(entry.name).set, stall_after_s=settings.request_timeout_s)
    return ServedModel(entry.name, package, settings, metrics, batcher, backend.name, max_batch)


async def _start_shadow(serving: Serving, entries: List[NamedPackage]) -> Optional[ShadowProcess]:
    """Connect the watched model to the one shadow process: ``cskd serve``'s (its socket in the settings), or one
    started here for an app made by ``create_app`` alone (returned, for the lifespan to stop)."""
    settings = serving.settings
    pair = await run_in_threadpool(resolve_shadow, settings, entries)  # refused in one line, before anything runs
    own = None if settings.shadow_socket else await run_in_threadpool(ShadowProcess.start, settings, entries)
    feed = ShadowFeed(settings.shadow_socket or own.socket, settings, pair.watched.name, pair.teacher.name)
    if not await feed.connect(SHADOW_CONNECT_S):
        logger.warning("shadow: no answer from the shadow process at %s yet; serving, and connecting in the background",
                       feed.socket_path)
    serving.models[pair.watched.name].on_answer, serving.shadow = feed.offer, feed
    serving.metrics.registry.register(ShadowCollector(feed))
    return own


def _lifespan(serving: Serving):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings = serving.settings
        entries = resolve_packages(settings.packages)
        threads = engine_threads(settings.threads, len(entries), settings.workers)
        for entry in entries:
            model = await run_in_threadpool(_load, entry, serving, threads)
            model.batcher.start()
            serving.models[entry.name] = model
        own_shadow = await _start_shadow(serving, entries) if settings.shadow else None
        serving.ready = True
        grpc_server = None
        if settings.grpc_port:
            from cskd.serve.grpc_service import start_grpc_server  # grpcio: only when a gRPC port is asked for

            grpc_server = await start_grpc_server(serving, settings.host, settings.grpc_port)
        try:
            yield
        finally:
            serving.ready = False
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            for model in serving.models.values():
                await model.batcher.close()  # answer everything already accepted
            if serving.shadow is not None:
                await serving.shadow.close()
            if own_shadow is not None:
                await run_in_threadpool(own_shadow.stop)

    return lifespan


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes: at once by Content-Length, else while they stream in (413)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        length = parse_count(declared.decode("latin-1"))
        if length is not None and length > self.limit or length is None and declared.strip().isdigit():  # 19+ digits: too large too
            response = error_response(413, "too_large", f"request body of {declared[:40].decode('latin-1')} bytes exceeds the "
                                                        f"limit of {self.limit} bytes", scope.get("path", ""))
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised inside the route: the APIError handler answers 413
                raise APIError(413, "too_large", f"request body exceeds the limit of {self.limit} bytes")
            return message

        return await self.app(scope, counted_receive, send)


CLIENT_CLOSED = 499  # the status label of a request whose client left before it was answered (nginx's)


class MetricsMiddleware:
    """Requests by route and status, and their latency (plain ASGI: no per-request task or stream wrapping).
    A request that ends without an answer because its client hung up counts as 499, never as a 5xx:
    alerts are built on the 5xx count, and a client must not be able to raise it by leaving."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [CLIENT_CLOSED]  # the app ends without answering only when the client left

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded_send)
        except BaseException:
            if status[0] == CLIENT_CLOSED:
                status[0] = 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)


def create_app(model_dir: str | Sequence[str] = "", **settings: Any) -> FastAPI:
    """The inference service for one model package, or several (each under its own name); ``settings``
    are :class:`ServeSettings` fields.

    Example::

        app = create_app("runs/demo/export-onnx-fp32", max_batch=16)
        app = create_app(["runs/demo/export-onnx-int8", "runs/demo/export-teacher-onnx-fp32"],
                         shadow="teacher-regnety_016", shadow_rate=0.05)
        uvicorn.run(app)
    """
    if isinstance(model_dir, (list, tuple)):
        settings["model_dirs"] = [str(m) for m in model_dir]
        model_dir = ""
    config = ServeSettings(model_dir=str(model_dir) if model_dir else ServeSettings().model_dir, **settings)
    serving = Serving(settings=config, metrics=create_metrics())
    app = FastAPI(title="cskd inference", version=__version__, lifespan=_lifespan(serving),
                  description="Image classification with a distilled ViT exported by cskd.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # served by routers/docs.py, behind the key
    app.state.serving = serving
    install_handlers(app)
    app.add_middleware(InferenceLane, routes=INFERENCE_ROUTES)  # innermost: after the body limit, CORS and metrics
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=serving.metrics)
    for router in (health.router, predict.router, model.router, shadow.router, kserve.router, kserve.server, kserve.models,
                   docs.router):
        app.include_router(router)
    return app


# The inference routes are declared on their routers (so /docs and the OpenAPI schema describe them)
# and answered by InferenceLane, inside the metrics and body-limit middleware but before FastAPI's
# exception middleware, router and dependency solving, which cost ~150 us of CPU per request here
# (docs/benchmarks.md): a tenth of the student's engine time. Their endpoints take only the request
# and check key and readiness themselves (serving_for).
INFERENCE_ROUTES = [("/predict", predict.predict), ("/v2/models/{name}/infer", kserve.infer),
                    ("/v2/models/{name}/versions/{version}/infer", kserve.infer)]


@dataclass(frozen=True)
class _Route:
    path: str  # the template, as FastAPI's routes name themselves in the scope (the metrics' route label)


class InferenceLane:
    """POSTs to the inference routes go straight to their endpoints; everything else to the app."""

    def __init__(self, app, routes: Sequence[Tuple[str, Callable[[Request], Awaitable[Response]]]]) -> None:
        self.app = app
        self.routes = [(compile_path(path)[0], _Route(path), endpoint) for path, endpoint in routes]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            for pattern, route, endpoint in self.routes:
                match = pattern.match(scope["path"])
                if match:
                    scope["route"], scope["path_params"] = route, match.groupdict()
                    try:
                        response = await endpoint(Request(scope, receive, send))
                    except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing failed (counted 499)
                        return
                    except Exception as exc:  # the app's own handlers would answer the same
                        if not isinstance(exc, APIError):  # a failing backend or a bug: into the server log
                            logger.exception("%s %s failed", scope["method"], scope["path"])
                        response = response_for(exc, scope["path"])
                    return await response(scope, receive, send)
        return await self.app(scope, receive, send)
