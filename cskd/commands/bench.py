"""``cskd bench``: deployed students against their teacher (latency, throughput, accuracy), or a
load test of a running server (``cskd bench http URL``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable

from cskd.errors import CSKDError
from cskd.files import atomic_write_json
from cskd.runtime.package import MODEL_JSON

EXAMPLES = """\
examples:
  cskd bench runs/demo/export-onnx-int8 --teacher runs/demo/export-teacher-onnx-fp32
      # clean top-1, agreement, speed, and the shift suite (15 corruptions + 3 geometric shifts x 5 severities)
  cskd bench S-int8 --teacher T --min-robustness-ratio 0.8   # fail if S keeps < 0.8x of T's accuracy on a shift
  cskd bench S-int8 --teacher T --shift-families noise blur --shift-severities 1 3 5 --shift-images 200
  cskd bench S-int8 --teacher T --no-shifts                  # clean images only
  cskd bench S-fp32 S-fp16 S-int8 --teacher T --batch-sizes 1 8 32 --out bench/
  cskd bench runs/demo --teacher runs/teacher --quick --expect-speedup 3 --max-accuracy-drop 5   # a CI gate
  cskd bench S-fp32 S-int8 --teacher T --served                    # also as deployed: cskd serve + hey, c1 and c16
  cskd bench S-int8 --teacher T --served --served-seconds 20 --expect-speedup 4   # gate on the served speedup too
  cskd bench http http://127.0.0.1:8000 --concurrency 32 --duration 60   # load a running cskd serve
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="deployed students against the teacher: latency, throughput, accuracy",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Benchmark model packages (run directories are exported first) against a teacher package.")
    p.add_argument("students", nargs="+", metavar="STUDENT", help="student packages or run directories; or: http URL")
    p.add_argument("--teacher", type=Path, metavar="TEACHER", help="teacher package or run directory")
    p.add_argument("--concurrency", type=int, default=32, help="bench http: concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="bench http: seconds of load")
    p.add_argument("--image", type=Path, help="bench http: the image to post (default: an embedded validation image)")
    p.add_argument("--api-key", help="bench http: bearer token")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--backend", help="onnxruntime, tensorrt or torch (default: each package's own)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per model, batch size and round")
    p.add_argument("--eval-images", type=int, default=2000, help="validation images for top-1 (0: latency only)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--providers", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                   help="onnxruntime execution providers in order, comma-separated (e.g. TensorrtExecutionProvider,"
                        "CUDAExecutionProvider); default: CUDA when onnxruntime-gpu has it, else the CPU")
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 calls, 500 images: a smoke test")
    p.add_argument("--expect-speedup", type=float, help="fail unless every student is this many times faster")
    p.add_argument("--max-accuracy-drop", type=float, help="fail when a student loses more top-1 points than this")
    p.add_argument("--served", action="store_true", help="also serve each package with cskd serve and drive it with hey "
                                                         "(apt-get install hey): served p50/p99, throughput, speedup")
    p.add_argument("--served-concurrency", type=int, nargs="+", default=[1, 16], help="--served: concurrent clients (default 1 16)")
    p.add_argument("--served-seconds", type=float, default=10.0, help="--served: seconds of load per package and concurrency")
    p.add_argument("--served-rounds", type=int, default=1, help="--served: interleaved rounds (median reported)")
    p.add_argument("--serve-args", default="", help="--served: further cskd serve flags for every package, e.g. '--max-wait-ms 2'")
    p.add_argument("--no-shifts", action="store_true", help="skip the shift suite (on wherever top-1 is measured)")
    p.add_argument("--shift-images", type=int, default=500, help="validation images the shift suite shifts (default 500)")
    p.add_argument("--shift-severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="severities (default 1-5)")
    p.add_argument("--shift-families", nargs="+", metavar="FAMILY",
                   help="noise blur weather digital geometric (default: all)")
    p.add_argument("--min-robustness-ratio", type=float, metavar="R",
                   help="fail when a student keeps less than R x what its teacher keeps of its accuracy on any shift")
    p.add_argument("--data", help="data set for top-1 (default: the run's)")
    p.add_argument("--data-path")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json and the plots")
    p.set_defaults(func=run)


def as_package(path: Path, log: Callable[[str], None]) -> Path:
    """A model package folder, or a run directory / checkpoint exported to fp32 ONNX on the fly."""
    from cskd.export.exporter import ExportOptions, default_out, export_model  # torch and onnx: only to export

    if (path / MODEL_JSON).is_file():
        return path
    options = ExportOptions()
    out = default_out(path, options)
    if (out / MODEL_JSON).is_file():
        return out
    log(f"{path} is not a model package: exporting it to {out}")
    return export_model(path, options, log)[0]


def run(args: argparse.Namespace) -> int:
    if args.students[0] == "http":
        return run_http(args)
    from cskd.measure.bench import BenchOptions, format_table, run_bench  # the training stack: only for this command
    from cskd.measure.robustness import ShiftOptions, format_suite, validate_shift_options
    from cskd.measure.served import ServedOptions, check_served_tools, format_served

    if args.teacher is None:
        raise CSKDError("cskd bench needs --teacher TEACHER_PACKAGE (or use `cskd bench http URL`)")
    if args.backend == "torch":
        import cskd.commands.torch_backend  # noqa: F401  registers "torch"
    options = BenchOptions(batch_sizes=args.batch_sizes, backend=args.backend, rounds=args.rounds, iters=args.iters,
                           eval_images=args.eval_images, threads=args.threads, providers=args.providers, data=args.data,
                           data_path=args.data_path, expect_speedup=args.expect_speedup,
                           max_accuracy_drop=args.max_accuracy_drop, out=args.out)
    if args.no_shifts:
        if args.min_robustness_ratio is not None:
            raise CSKDError("--min-robustness-ratio gates the shift suite, which --no-shifts turns off: drop one of them")
        options.shifts = None
    else:
        options.shifts = ShiftOptions(images=args.shift_images, severities=args.shift_severities, families=args.shift_families,
                                      min_ratio=args.min_robustness_ratio)
        validate_shift_options(options.shifts)
    if args.served:
        if any(c < 1 for c in args.served_concurrency):
            raise CSKDError(f"--served-concurrency takes positive numbers, got {args.served_concurrency}")
        options.served = ServedOptions(concurrency=args.served_concurrency, seconds=args.served_seconds,
                                       rounds=args.served_rounds, threads=args.threads, serve_args=shlex.split(args.serve_args))
        check_served_tools()  # before the run directories are exported and anything is timed
    if args.quick:
        options.rounds, options.iters, options.warmup, options.eval_images = 2, 5, 2, 500
        if options.shifts is not None:
            options.shifts.images = min(options.shifts.images, 200)
    students = [as_package(Path(s), print) for s in args.students]
    result = run_bench(students, as_package(args.teacher, print), options)
    print(format_table(result))
    if result.get("shifts"):
        print(format_suite(result["shifts"]))
        for warning in result["shifts"]["warnings"]:
            print(f"cskd bench: warning: {warning}", file=sys.stderr)
    if "served" in result:
        print(format_served(result["served"]))
    print(f"wrote {args.out / 'bench.json'}, {', '.join(result['plots'])}")
    for failure in result["failures"]:
        print(f"cskd bench: gate failed: {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


def run_http(args: argparse.Namespace) -> int:
    import asyncio

    from cskd.measure.loadtest import demo_image_png, format_load, run_load  # httpx: the serve extra

    if len(args.students) != 2:
        raise CSKDError("usage: cskd bench http URL [--concurrency N] [--duration S]")
    image = args.image.read_bytes() if args.image else demo_image_png()
    result = asyncio.run(run_load(args.students[1], image, args.concurrency, args.duration, args.api_key))
    print(format_load(result))
    atomic_write_json(args.out / "bench_http.json", result)
    print(f"wrote {args.out / 'bench_http.json'}")
    return 0 if result["errors"] == 0 else 1
