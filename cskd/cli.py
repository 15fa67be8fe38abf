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
