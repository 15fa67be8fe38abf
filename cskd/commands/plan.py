"""``cskd plan``: choose the student for a deployment target before training (see :mod:`cskd.measure.plan`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cskd.configs import packaged_names

EXAMPLES = """\
examples:
  cskd plan                                               # the demo: 10 students and its teacher, onnxruntime fp32
  cskd plan --precision int8 --min-speedup 4              # which students are 4x faster than the teacher at int8?
  cskd plan --backend openvino --precision int8 --max-latency-ms 0.5 --batch-sizes 1 16
  cskd plan --config my.yaml data.path=ROOT --teacher runs/teacher/export-onnx-fp32    # your data, a teacher package
  cskd plan --candidates cskd_deit_nano_distilled_patch4_32:embed_dim=128,depth=6,num_heads=4 \\
      deit_tiny_distilled_patch16_224:patch_size=8          # your own candidates: timm NAME[:key=value,...]
  cskd plan --precision int8 --min-speedup 4 --proxy-epochs 3 --train    # rank in the time of 3 demo epochs, train the best
  cskd plan --served --min-speedup 3                      # judged behind cskd serve (hey at concurrency 1)
  cskd plan --precision int8 --min-speedup 4 --out runs/plan --force    # again into runs/plan, replacing the last plan there

Each candidate is built untrained from the config and its overrides, exported as `cskd export` would
(the parity gate off: random weights), and timed with the teacher in one interleaved `cskd bench` run;
FLOPs come from torch's counter, training images/s from the real step on this machine. Writes
OUT/plan.json (after every stage, so a failure keeps what was measured), OUT/plan.png and, for each
candidate within budget, the `cskd train` command that trains it. An OUT that holds a plan is refused
before any work; --force replaces that plan's files (its proxy and train runs too).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose the student for a deployment target before training: measured, not guessed",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build, export and time candidate students with their teacher on the target backend "
                                   "and precision; mark those within a latency budget; optionally rank them by a short "
                                   "training and train the pick.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys, as cskd train takes them")
    p.add_argument("--config", help="YAML file, or a packaged recipe by name (default: demo): " + ", ".join(packaged_names()))
    p.add_argument("--teacher", type=Path, help="the teacher to measure against: a model package, run directory or "
                                                "checkpoint (default: the config's teacher, exported as cskd export --teacher)")
    p.add_argument("--teacher-precision", default="fp32", help="precision of the config's teacher when exported (default fp32)")
    p.add_argument("--backend", default="onnxruntime", help="the target runtime: onnxruntime (default), openvino or tensorrt")
    p.add_argument("--precision", default="fp32", help="the candidates' precision: fp32 (default), fp16 or int8")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time (1 always: the budget's)")
    p.add_argument("--served", action="store_true", help="judge the budget behind cskd serve, as cskd bench --served "
                                                         "(hey at concurrency 1; apt-get install hey)")
    p.add_argument("--served-seconds", type=float, default=5.0, help="--served: seconds of load per package")
    p.add_argument("--max-latency-ms", type=float, help="budget: batch-1 p50 latency at most this (ms)")
    p.add_argument("--min-speedup", type=float, help="budget: at least this many times faster than the teacher at batch 1")
    p.add_argument("--candidates", nargs="+", metavar="SPEC", help="timm NAME[:key=value,...] students instead of the default "
                                                                   "family (patch_size=N sets the patch size)")
    p.add_argument("--calib-images", type=int, default=64, help="int8: training images each candidate is calibrated on")
    p.add_argument("--rounds", type=int, default=5, help="interleaved benchmark rounds (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per model, batch size and round")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per candidate and round (after 3 of warm-up)")
    p.add_argument("--train-rounds", type=int, default=3, help="interleaved rounds of training steps (median reported)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    p.add_argument("--proxy-epochs", type=int, default=0, help="train the candidates within budget briefly from the cached "
                                                               "teacher, the config's student this many epochs and each other "
                                                               "one in the same wall time (a budget of optimiser steps from its "
                                                               "real step and validation times), and rank them by fused top-1; "
                                                               "their real seconds per epoch give each one's epochs in the "
                                                               "config student's full training time")
    p.add_argument("--proxy-schedule", default="time", help="time (default): equal wall time per candidate, as step budgets "
                                                            "with the LR schedule over them; epochs: --proxy-epochs each")
    p.add_argument("--train", action="store_true", help="then train the pick (best proxy top-1, else most FLOPs within "
                                                        "budget), in the config student's training time when measured")
    p.add_argument("--out", type=Path, help="output folder (default: runs/plan-<timestamp>); one holding a plan is refused")
    p.add_argument("--force", action="store_true", help="replace the plan already in --out (its plan.json, packages, proxy "
                                                        "and train runs; nothing else there), as cskd export --force does")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cskd.measure.candidates import parse_candidate  # the training stack (torch): only for this command
    from cskd.measure.plan import PlanOptions, format_plan, format_summary, plan

    options = PlanOptions(
        config=args.config, overrides=args.overrides, teacher=args.teacher, teacher_precision=args.teacher_precision,
        backend=args.backend, precision=args.precision, batch_sizes=args.batch_sizes, served=args.served,
        served_seconds=args.served_seconds, max_latency_ms=args.max_latency_ms, min_speedup=args.min_speedup,
        candidates=[parse_candidate(text) for text in args.candidates or []], calib_images=args.calib_images,
        rounds=args.rounds, iters=args.iters, train_steps=args.train_steps, train_rounds=args.train_rounds,
        threads=args.threads,
        proxy_epochs=args.proxy_epochs, proxy_schedule=args.proxy_schedule, train=args.train, out=args.out, force=args.force,
        show_progress=not args.no_progress)
    result = plan(options)
    print(format_plan(result))
    print("\n".join(format_summary(result)))
    out = Path(result["out"])
    minutes, seconds = divmod(int(round(result["wall_s"])), 60)
    print(f"done in {minutes}m{seconds:02d}s: wrote {out / 'plan.json'}, {out / 'plan.png'} (exports: {out / 'plan.log'})")
    if "trained" in result:
        trained = result["trained"]
        print(f"trained {trained['label']}: best val top-1 {trained['best_top1']:.2f}% in {trained['run']}")
    return 0
