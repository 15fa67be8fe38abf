"""``cskd eval``: top-1/top-5 of every head of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  cskd eval runs/cskd-demo                      # best.safetensors of a run, on its validation split
  cskd eval runs/cskd-demo/last.safetensors --json eval.json
  cskd eval RUN --data fashion-mnist --data-path /usr/share/datasets/fashion-mnist
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of every head of a checkpoint", epilog=EXAMPLES,
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cskd.evaluate import format_table, run_eval, write_json  # torch: only for this command

    result = run_eval(args.checkpoint, args.data, args.data_path, args.split, args.batch_size, args.device,
                      args.workers, show_progress=not args.no_progress)
    print(format_table(result))
    out = args.json or Path(result["checkpoint"]).parent / "eval.json"
    write_json(result, out)
    print(f"wrote {out}")
    return 0
