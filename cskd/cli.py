"""The ``cskd`` command line. Heavy libraries are imported inside each command, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from cskd import __version__
from cskd.errors import CSKDError

TRAIN_EXAMPLES = """\
examples:
  cskd train                                    # CSKD on the embedded Fashion-MNIST demo (packaged teacher)
  cskd train train.epochs=2 output=runs/quick   # any config key as key=value
  cskd train --config my.yaml loss.cskd_type=none        # DeiT distillation baseline
  cskd train --config teacher-demo              # train the demo CNN teacher (no distillation)
  cskd train --resume runs/quick train.epochs=4          # continue a run (longer schedule)
  torchrun --nproc-per-node 2 -m cskd train ...          # data-parallel on 2 processes

config keys (defaults: cskd/configs/demo.yaml; full list and meaning in the README):
  data.name data.path data.channels data.workers data.auto_augment data.scale data.hflip
  data.reprob data.mixup data.cutmix data.mixup_prob data.mixup_switch_prob data.smoothing
  student.model student.img_size student.patch_size student.drop_path student.kwargs
  teacher.model teacher.checkpoint teacher.img_size teacher.kwargs
  train.target train.epochs train.batch_size train.lr train.min_lr train.warmup_epochs
  train.weight_decay train.opt train.clip_grad train.ema train.ema_decay train.amp
  train.compile train.device train.seed train.threads
  loss.alpha loss.deit_type loss.cskd_type loss.cskd_weight loss.decay loss.tau   output
"""

EVAL_EXAMPLES = """\
examples:
  cskd eval runs/cskd-demo                      # best.safetensors of a run, on its validation split
  cskd eval runs/cskd-demo/last.safetensors --json eval.json
  cskd eval RUN --data fashion-mnist --data-path /usr/share/datasets/fashion-mnist
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a student by CSKD (or a CNN teacher)", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a DeiT student from a CNN teacher with Cumulative Spatial Knowledge Distillation.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument("--config", type=Path, help="YAML file, or a packaged config by name: demo (default), teacher-demo")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of every head of a checkpoint", epilog=EVAL_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate the class, distillation, dense-mean and fused heads of a checkpoint.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--data", help="data set name (default: the run's)")
    p.add_argument("--data-path", help="data folder for fashion-mnist or imagefolder")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="where to write the JSON (default: eval.json beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


EXPORT_EXAMPLES = """\
examples:
  cskd export runs/demo                                  # fp32 ONNX package in runs/demo/export-onnx-fp32
  cskd export runs/demo --precision int8                 # onnxruntime static int8 (QDQ), calibrated
  cskd export runs/demo --input uint8 --out models/demo  # clients send raw pixels
  cskd export runs/demo --teacher                        # the teacher the run distilled from
  cskd export runs/demo --format trt --precision fp16    # TensorRT engine (CUDA machine)
"""

PREDICT_EXAMPLES = """\
examples:
  cskd predict runs/demo/export-onnx-fp32 shirt.png boot.jpg
  cskd predict models/demo *.png --top-k 3 --json predictions.json
"""


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="fuse the heads and export to ONNX or TensorRT, with a parity gate",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export a checkpoint as a model package (engine + model.json), checked against PyTorch on real images.")
    p.add_argument("source", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", default="onnx", help="onnx (default) or trt")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16 or int8")
    p.add_argument("--input", dest="input_kind", default="float", help="float: normalised tensors (default); uint8: raw pixels")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the engine serves (TensorRT profile)")
    p.add_argument("--probabilities", action="store_true", help="add a softmax output beside the logits")
    p.add_argument("--out", type=Path, help="package folder (default: RUN/export-FORMAT-PRECISION)")
    p.add_argument("--teacher", action="store_true", help="export the teacher the student run distilled from")
    p.add_argument("--no-gate", action="store_true", help="keep the package even when parity fails (recorded in model.json)")
    p.add_argument("--parity-images", type=int, default=500)
    p.add_argument("--calib-images", type=int, default=512, help="training images for int8 calibration")
    p.add_argument("--data", help="data set for parity and calibration (default: the run's)")
    p.add_argument("--data-path")
    p.add_argument("--force", action="store_true", help="replace an existing package folder")
    p.set_defaults(func=_cmd_export)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files through an exported model",
                       epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Classify image files with a model package (no torch needed for ONNX packages).")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "torch"), help="default: the package's own")
    p.add_argument("--json", type=Path, help="also write the predictions as JSON")
    p.set_defaults(func=_cmd_predict)


def _cmd_export(args: argparse.Namespace) -> int:
    from cskd.export.exporter import ExportOptions, export_model

    options = ExportOptions(
        format=args.format, precision=args.precision, input_kind=args.input_kind, max_batch=args.max_batch,
        probabilities=args.probabilities, out=args.out, teacher=args.teacher, gate=not args.no_gate,
        parity_images=args.parity_images, calib_images=args.calib_images, data=args.data, data_path=args.data_path,
        force=args.force,
    )
    export_model(args.source, options)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from cskd.serve.predict import format_predictions, predict_files

    if args.top_k < 1:
        raise CSKDError(f"--top-k must be at least 1, got {args.top_k}")
    results = predict_files(args.model_dir, args.images, args.top_k, args.backend)
    print(format_predictions(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


BENCH_EXAMPLES = """\
examples:
  cskd bench runs/demo/export-onnx-int8 --teacher runs/demo/export-teacher-onnx-fp32
  cskd bench S-fp32 S-fp16 S-int8 --teacher T --batch-sizes 1 8 32 --out bench/
  cskd bench runs/demo --teacher runs/teacher --quick --expect-speedup 3 --max-accuracy-drop 5   # a CI gate
  cskd bench http http://127.0.0.1:8000 --concurrency 32 --duration 60   # load a running cskd serve
"""


SERVE_EXAMPLES = """\
examples:
  cskd serve runs/demo/export-onnx-fp32                       # http://127.0.0.1:8000/docs
  cskd serve models/demo --host 0.0.0.0 --port 8080 --workers 2 --api-key "$KEY"
  cskd serve models/demo --max-batch 32 --max-wait-ms 5 --max-queue 256
  curl -F files=@shirt.png http://127.0.0.1:8000/predict
every option can also come from CSKD_SERVE_<OPTION> environment variables (CSKD_SERVE_API_KEY, ...)
"""


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP inference service (FastAPI): /predict, KServe v2, /metrics",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve a model package with dynamic batching.")
    p.add_argument("model_dir", type=Path, nargs="?", metavar="MODEL_DIR", help="model package (or CSKD_SERVE_MODEL_DIR)")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "torch"))
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="server processes, each with its own copy of the model")
    p.add_argument("--threads", type=int, help="onnxruntime threads per process")
    p.add_argument("--max-batch", type=int, help="images per inference call (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="time a batch waits to fill (default 5)")
    p.add_argument("--max-queue", type=int, help="queued images before answering 503 (default 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (prefer CSKD_SERVE_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from cskd.export.package import read_package
    from cskd.serve.settings import ServeSettings

    given = {k: v for k, v in {
        "model_dir": str(args.model_dir) if args.model_dir else None, "backend": args.backend, "host": args.host,
        "port": args.port, "workers": args.workers, "threads": args.threads, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue, "api_key": args.api_key}.items() if v is not None}
    settings = ServeSettings(**given)
    if not settings.model_dir:
        raise CSKDError("no model package given: pass MODEL_DIR or set CSKD_SERVE_MODEL_DIR")
    package = read_package(settings.model_dir)  # fail in one line before uvicorn starts
    for key, value in given.items():  # worker processes read their settings from the environment
        os.environ[f"CSKD_SERVE_{key.upper()}"] = str(value)
    print(f"cskd serve: {package.name} ({package.engine_format}/{package.precision}) on http://{settings.host}:{settings.port}"
          f" (docs at /docs), batching up to {settings.max_batch} images / {settings.max_wait_ms} ms")
    uvicorn.run("cskd.serve.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="deployed students against the teacher: latency, throughput, accuracy",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Benchmark model packages (run directories are exported first) against a teacher package.")
    p.add_argument("students", nargs="+", metavar="STUDENT", help="student packages or run directories; or: http URL")
    p.add_argument("--teacher", type=Path, metavar="TEACHER", help="teacher package or run directory")
    p.add_argument("--concurrency", type=int, default=32, help="bench http: concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="bench http: seconds of load")
    p.add_argument("--image", type=Path, help="bench http: the image to post (default: an embedded validation image)")
    p.add_argument("--api-key", help="bench http: bearer token")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt", "torch"), help="default: each package's own")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per model, batch size and round")
    p.add_argument("--eval-images", type=int, default=2000, help="validation images for top-1 (0: latency only)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 calls, 500 images: a smoke test")
    p.add_argument("--expect-speedup", type=float, help="fail unless every student is this many times faster")
    p.add_argument("--max-accuracy-drop", type=float, help="fail when a student loses more top-1 points than this")
    p.add_argument("--data", help="data set for top-1 (default: the run's)")
    p.add_argument("--data-path")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json and the plots")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.students[0] == "http":
        return _cmd_bench_http(args)
    from cskd.bench import BenchOptions, format_table, run_bench

    if args.teacher is None:
        raise CSKDError("cskd bench needs --teacher TEACHER_PACKAGE (or use `cskd bench http URL`)")
    args.students = [Path(s) for s in args.students]

    options = BenchOptions(batch_sizes=args.batch_sizes, backend=args.backend, rounds=args.rounds, iters=args.iters,
                           eval_images=args.eval_images, threads=args.threads, data=args.data, data_path=args.data_path,
                           expect_speedup=args.expect_speedup, max_accuracy_drop=args.max_accuracy_drop, out=args.out)
    if args.quick:
        options.rounds, options.iters, options.warmup, options.eval_images = 2, 5, 2, 500
    result = run_bench(args.students, args.teacher, options)
    print(format_table(result))
    print(f"wrote {args.out / 'bench.json'}, {', '.join(result['plots'])}")
    for failure in result["failures"]:
        print(f"cskd bench: gate failed: {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


def _cmd_bench_http(args: argparse.Namespace) -> int:
    import asyncio
    import io
    import json

    from cskd.serve.loadtest import format_load, run_load

    if len(args.students) != 2:
        raise CSKDError("usage: cskd bench http URL [--concurrency N] [--duration S]")
    if args.image:
        image = args.image.read_bytes()
    else:
        from PIL import Image

        from cskd.data.datasets import demo_arrays

        buf = io.BytesIO()
        Image.fromarray(demo_arrays("val")[0][0], mode="L").save(buf, format="PNG")
        image = buf.getvalue()
    result = asyncio.run(run_load(args.students[1], image, args.concurrency, args.duration, args.api_key))
    print(format_load(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_http.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_http.json'}")
    return 0 if result["errors"] == 0 else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from cskd.config import load_config

    if args.resume is not None:
        config_file = args.resume / "config.yaml"
        if not config_file.is_file():
            raise CSKDError(f"{args.resume} is not a run directory (no config.yaml); pass the output folder of `cskd train`")
        if args.config is not None:
            raise CSKDError("--resume takes its config from the run directory; drop --config (overrides still apply)")
        cfg = load_config(config_file, [*args.overrides, f"output={args.resume}"])
    else:
        cfg = load_config(args.config, args.overrides)
    from cskd.train import train

    train(cfg, resume=args.resume is not None, show_progress=not args.no_progress)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from cskd.evaluate import format_table, run_eval, write_json

    result = run_eval(args.checkpoint, args.data, args.data_path, args.split, args.batch_size, args.device,
                      args.workers, show_progress=not args.no_progress)
    print(format_table(result))
    out = args.json or Path(result["checkpoint"]).parent / "eval.json"
    write_json(result, out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cskd",
        description="Distil a fast ViT from a CNN teacher (CSKD), then evaluate, export, serve and benchmark it.",
        epilog="run `cskd COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"cskd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_bench(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CSKDError as exc:
        print(f"cskd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cskd {args.command}: interrupted; a run continues with `cskd train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
