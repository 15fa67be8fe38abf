"""``cskd serve``: the HTTP inference service (FastAPI + uvicorn) for a model package."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from cskd.errors import CSKDError
from cskd.runtime.package import read_package

DEFAULT_GRPC_PORT = 8001  # Triton's and KServe's

EXAMPLES = """\
examples:
  cskd serve runs/demo/export-onnx-fp32                       # http://127.0.0.1:8000/docs, gRPC on :8001
  cskd serve models/demo --host 0.0.0.0 --port 8080 --grpc-port 8081 --workers 2 --api-key "$KEY"
  cskd serve models/demo --max-batch 32 --max-wait-ms 2 --max-queue 256   # hold batches open 2 ms to fill
  cskd serve models/demo --grpc-port 0 --access-log                 # HTTP only, one log line per request
  curl -F files=@shirt.png http://127.0.0.1:8000/predict
every option can also come from CSKD_SERVE_<OPTION> environment variables (CSKD_SERVE_API_KEY, ...)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP inference service (FastAPI): /predict, KServe v2, /metrics",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve a model package with dynamic batching.")
    p.add_argument("model_dir", type=Path, nargs="?", metavar="MODEL_DIR", help="model package (or CSKD_SERVE_MODEL_DIR)")
    p.add_argument("--backend", help="onnxruntime, tensorrt or torch (default: the package's own)")
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help=f"KServe v2 gRPC port (default {DEFAULT_GRPC_PORT}; 0: no gRPC)")
    p.add_argument("--workers", type=int, help="server processes, each with its own copy of the model")
    p.add_argument("--threads", type=int, help="onnxruntime threads per process")
    p.add_argument("--providers", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                   help="onnxruntime execution providers in order, comma-separated (e.g. TensorrtExecutionProvider,"
                        "CUDAExecutionProvider); default: CUDA when onnxruntime-gpu has it, else the CPU")
    p.add_argument("--max-batch", type=int, help="images per inference call (default 32; capped by the engine's limit)")
    p.add_argument("--max-wait-ms", type=float, help="time a batch waits to fill after its first image (default 0: a "
                                                       "request runs as soon as the engine is free)")
    p.add_argument("--max-queue", type=int, help="queued images before answering 503 (default 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (prefer CSKD_SERVE_API_KEY)")
    p.add_argument("--access-log", action="store_true", default=None, help="log one line per request (off by default: "
                                                                             "it costs CPU on every request)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def create_app_from_env():
    """uvicorn factory for every worker process: settings from ``CSKD_SERVE_*`` variables."""
    from cskd.serve.app import create_app  # FastAPI: the serve extra
    from cskd.serve.settings import ServeSettings

    if ServeSettings().backend == "torch":
        import cskd.commands.torch_backend  # noqa: F401  registers "torch" (imports torch: only when asked)
    return create_app()


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse in one line, before anything starts, a port another process listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a listener fails, TIME_WAIT does not
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CSKDError(f"cannot listen for gRPC on {host}:{port} ({exc.strerror}); choose another {flag}, "
                            "or 0 for no gRPC") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the serving stack (the serve extra) loads only for this command

    from cskd.serve.settings import ServeSettings

    given = {k: v for k, v in {
        "model_dir": str(args.model_dir) if args.model_dir else None, "backend": args.backend, "host": args.host,
        "port": args.port, "grpc_port": args.grpc_port, "access_log": args.access_log, "workers": args.workers,
        "threads": args.threads, "providers": args.providers, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue, "api_key": args.api_key}.items() if v is not None}
    if args.grpc_port is None and "CSKD_SERVE_GRPC_PORT" not in os.environ:
        given["grpc_port"] = DEFAULT_GRPC_PORT  # the command serves gRPC beside HTTP, as Triton does
    try:
        settings = ServeSettings(**given)
    except ValueError as exc:  # pydantic's ValidationError: one line per wrong setting
        first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
        where = ".".join(map(str, first.get("loc", ()))) or "settings"
        raise CSKDError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    if not settings.model_dir:
        raise CSKDError("no model package given: pass MODEL_DIR or set CSKD_SERVE_MODEL_DIR")
    package = read_package(settings.model_dir)  # fail in one line before uvicorn starts
    if settings.grpc_port:
        check_port_free(settings.host, settings.grpc_port, "--grpc-port")
    for key, value in given.items():  # worker processes read their settings from the environment
        os.environ[f"CSKD_SERVE_{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    limit = package.batch_limit(settings.max_batch)
    capped = f" (the engine's limit; asked {settings.max_batch})" if limit < settings.max_batch else ""
    window = f", each held {settings.max_wait_ms:g} ms to fill" if settings.max_wait_ms else " as soon as the engine is free"
    grpc = f", KServe v2 gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc_port else ""
    print(f"cskd serve: {package.name} ({package.engine_format}/{package.precision}) on http://{settings.host}:{settings.port}"
          f" (docs at /docs){grpc}, batching up to {limit} images{capped}{window}")
    uvicorn.run("cskd.commands.serve:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=args.log_level, access_log=settings.access_log,
                timeout_graceful_shutdown=30)
    return 0
