"""``cskd serve``: the HTTP inference service (FastAPI + uvicorn) for a model package."""

from __future__ import annotations

import argparse
import json
import os
import socket

from cskd.errors import CSKDError
from cskd.runtime.package import resolve_packages

DEFAULT_GRPC_PORT = 8001  # Triton's and KServe's

EXAMPLES = """\
examples:
  cskd serve runs/demo/export-onnx-fp32                       # http://127.0.0.1:8000/docs, gRPC on :8001
  cskd serve runs/demo/export-onnx-int8 runs/demo/export-teacher-onnx-fp32   # two models, each under its own name
  cskd serve models/triton                                    # every package of a folder (a Triton repository)
  cskd serve int8=runs/demo/export-onnx-int8 fp32=runs/demo/export-onnx-fp32 # NAME=PATH: one run's two exports
  cskd serve runs/demo/export-onnx-int8 --shadow runs/demo/export-teacher-onnx-fp32 --shadow-rate 0.05 \\
      --shadow-alert 0.85 --shadow-capture runs/captured    # watched by its teacher: GET /v1/shadow
  cskd serve models/triton --shadow teacher-regnety_016 --shadow-watch int8 --workers 2   # one shadow for both workers
  CSKD_SERVE_SHADOW_API_KEY=... cskd serve runs/demo/export-onnx-int8 --shadow runs/demo/export-teacher-onnx-fp32 \
      --shadow-url grpcs://gpu-box:8001                     # the teacher on another machine, its own key, over TLS
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
    p.add_argument("model_dirs", nargs="*", metavar="MODEL_DIR",
                   help="model packages, folders of packages, or NAME=PATH (or CSKD_SERVE_MODEL_DIR); the first answers "
                        "/predict unless ?model=NAME says otherwise")
    p.add_argument("--backend", help="onnxruntime, tensorrt or torch (default: the package's own)")
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help=f"KServe v2 gRPC port (default {DEFAULT_GRPC_PORT}; 0: no gRPC)")
    p.add_argument("--workers", type=int, help="server processes, each with its own copy of the model")
    p.add_argument("--threads", type=int, help="onnxruntime threads of each model (default: every core for one model, "
                   "an equal share of the cores for several)")
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
    shadow = p.add_argument_group("shadow teacher", "a served model watched by its teacher on live traffic (GET /v1/shadow); "
                                  "one shadow process for every worker, at the lowest CPU priority")
    shadow.add_argument("--shadow", metavar="NAME_OR_PKG", help="the teacher: a served model's name, a package folder "
                                                                "(not served to clients), or NAME=PACKAGE")
    shadow.add_argument("--shadow-watch", metavar="NAME", help="the served model it watches (default: the first)")
    shadow.add_argument("--shadow-rate", type=float, metavar="R", help="share of the student's images the teacher also "
                                                                       "classifies (default 0.05)")
    shadow.add_argument("--shadow-alert", type=float, metavar="A", help="log a warning when the agreement over the window "
                                                                        "falls below A (e.g. 0.85)")
    shadow.add_argument("--shadow-window", type=int, metavar="N", help="samples the agreement is computed over (default 1000)")
    shadow.add_argument("--shadow-queue", type=int, metavar="N", help="sampled images waiting for the teacher at most; "
                                                                      "more are dropped and counted (default 64)")
    shadow.add_argument("--shadow-queue-bytes", type=int, metavar="B", help="bytes of sampled images waiting at most "
                                                                            "(default 32 MiB; as much again in flight)")
    shadow.add_argument("--shadow-threads", type=int, metavar="N", help="CPU threads of the teacher, at the lowest "
                                                                        "priority (default 1)")
    shadow.add_argument("--shadow-url", metavar="HOST:PORT", help="run the teacher on a remote KServe v2 gRPC endpoint "
                                                                  "(another cskd serve, or Triton); grpcs://HOST:PORT for TLS; "
                                                                  "--shadow names its package")
    shadow.add_argument("--shadow-api-key", metavar="KEY", help="the remote teacher's own key (prefer "
                                                                "CSKD_SERVE_SHADOW_API_KEY; --api-key is never sent)")
    shadow.add_argument("--shadow-ca", metavar="PEM", help="CA certificate of a grpcs:// remote (default: system roots)")
    shadow.add_argument("--shadow-capture", metavar="DIR", help="write every input the two disagree on as an image into "
                                                                "DIR (with index.jsonl): user images, off by default")
    shadow.add_argument("--shadow-capture-max-images", type=int, metavar="N", help="at most N captured images (default 10000)")
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


def settings_from_args(args: argparse.Namespace):
    """The server's settings: the command line over ``CSKD_SERVE_*`` variables, checked; and what was given.
    Packages on the command line replace the environment's (the serving image's baked-in CSKD_SERVE_MODEL_DIR)."""
    from cskd.serve.settings import ServeSettings

    given = {k: v for k, v in {
        "model_dirs": args.model_dirs or None, "backend": args.backend, "host": args.host,
        "port": args.port, "grpc_port": args.grpc_port, "access_log": args.access_log, "workers": args.workers,
        "threads": args.threads, "providers": args.providers, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue, "api_key": args.api_key,
        "shadow": args.shadow, "shadow_watch": args.shadow_watch, "shadow_rate": args.shadow_rate,
        "shadow_alert": args.shadow_alert, "shadow_window": args.shadow_window, "shadow_queue": args.shadow_queue,
        "shadow_queue_bytes": args.shadow_queue_bytes, "shadow_threads": args.shadow_threads,
        "shadow_url": args.shadow_url, "shadow_api_key": args.shadow_api_key, "shadow_ca": args.shadow_ca,
        "shadow_capture": args.shadow_capture, "shadow_capture_max_images": args.shadow_capture_max_images}.items()
        if v is not None}
    if args.model_dirs:
        given["model_dir"] = ""
    if args.grpc_port is None and "CSKD_SERVE_GRPC_PORT" not in os.environ:
        given["grpc_port"] = DEFAULT_GRPC_PORT  # the command serves gRPC beside HTTP, as Triton does
    try:
        settings = ServeSettings(**given)
    except ValueError as exc:  # pydantic's ValidationError: one line per wrong setting
        first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
        where = ".".join(map(str, first.get("loc", ()))) or "settings"
        raise CSKDError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return settings, given


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the serving stack (the serve extra) loads only for this command

    from cskd.serve.shadow.judge import resolve_shadow
    from cskd.serve.shadow.process import ShadowProcess

    settings, given = settings_from_args(args)
    entries = resolve_packages(settings.packages)  # fail in one line before uvicorn starts
    pair = resolve_shadow(settings, entries) if settings.shadow else None
    if settings.grpc_port:
        check_port_free(settings.host, settings.grpc_port, "--grpc-port")
    for key, value in given.items():  # worker processes read their settings from the environment
        os.environ[f"CSKD_SERVE_{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    window = f", each held {settings.max_wait_ms:g} ms to fill" if settings.max_wait_ms else " as soon as the engine is free"
    grpc = f", KServe v2 gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc_port else ""
    models = "; ".join(f"{e.name} ({e.package.engine_format}/{e.package.precision}, batches of up to "
                       f"{e.package.batch_limit(settings.max_batch)})" for e in entries)
    print(f"cskd serve: {models} on http://{settings.host}:{settings.port} (docs at /docs){grpc}; a batch runs{window}")
    shadow = None
    if pair is not None:
        where = (f" at {settings.shadow_url}" if settings.shadow_url
                 else f" in its own process on {settings.shadow_threads} thread(s) at the lowest priority")
        capture = f", disagreements captured in {settings.shadow_capture}" if settings.shadow_capture else ""
        print(f"  shadow teacher {pair.teacher.name}{where} watches {pair.watched.name} on {settings.shadow_rate:.0%} of its "
              f"images{capture}, for all {settings.workers} worker(s): GET /v1/shadow")
        shadow = ShadowProcess.start(settings, entries)  # one for every worker
        os.environ["CSKD_SERVE_SHADOW_SOCKET"] = shadow.socket
    try:
        uvicorn.run("cskd.commands.serve:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=args.log_level, access_log=settings.access_log,
                    timeout_graceful_shutdown=30)
    finally:
        if shadow is not None:
            shadow.stop()
    return 0
