"""``cskd train``: distil a student (or train a CNN teacher) from a config and overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from cskd.configs import packaged_names
from cskd.errors import CSKDError

EXAMPLES = """\
examples:
  cskd train                                    # CSKD on the embedded Fashion-MNIST demo (packaged teacher)
  cskd train train.epochs=2 output=runs/quick   # any config key as key=value
  cskd train --config my.yaml loss.cskd_type=none        # DeiT distillation baseline
  cskd train --config teacher-demo              # train the demo CNN teacher (no distillation)
  cskd train --resume runs/quick train.epochs=4          # continue a run (longer schedule)
  cskd cache-teacher data.unlabeled=/usr/share/datasets/fashion-mnist --out runs/cache-transfer
  cskd train data.unlabeled=/usr/share/datasets/fashion-mnist teacher.cache=runs/cache-transfer train.epochs=12
                                                # + unlabelled images the teacher alone supervises
  cskd train data.invariance=tone output=runs/tone   # distil invariance: noised input, the cached clean target
                                                # (recipes: tone, tone-affine; README "Will the student hold")
  cskd train --config finetune-teacher data.path=ROOT teacher.init=regnety_160.safetensors output=runs/t
  cskd train --config finetune data.path=ROOT student.init=deit_tiny_distilled_patch16_224.safetensors \
      teacher.checkpoint=runs/t teacher.cache=runs/t-cache  # fine-tune both from pretrained weights (README)
  cskd train --config finetune-demo data.path=ROOT student.init=runs/demo teacher.checkpoint=runs/t-demo \
      teacher.cache=runs/t-demo-cache                  # the same at the demo's sizes (32 px grayscale, finetune-teacher-demo)
  torchrun --nproc-per-node 2 -m cskd train ...          # data-parallel on 2 processes

config keys (defaults: cskd/configs/demo.yaml; full list and meaning in the README):
  data.name data.path data.channels data.workers data.unlabeled data.unlabeled_ratio
  data.auto_augment data.invariance data.scale data.hflip
  data.reprob data.mixup data.cutmix data.mixup_prob data.mixup_switch_prob data.smoothing
  student.model student.init student.img_size student.patch_size student.drop_path student.kwargs
  teacher.model teacher.checkpoint teacher.cache teacher.init teacher.img_size teacher.kwargs
  train.target train.epochs train.batch_size train.lr train.min_lr train.warmup_epochs
  train.weight_decay train.opt train.layer_decay train.clip_grad train.ema train.ema_decay train.amp
  train.compile train.device train.seed train.threads
  loss.alpha loss.deit_type loss.cskd_type loss.cskd_weight loss.decay loss.tau   output
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a student by CSKD (or a CNN teacher)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a DeiT student from a CNN teacher with Cumulative Spatial Knowledge Distillation.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument("--config", type=Path, help="YAML file, or a packaged recipe by name (default: demo): "
                   + ", ".join(packaged_names()))
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cskd.config import load_config  # the training stack (torch) loads only for this command
    from cskd.run import RunDir
    from cskd.train import train

    notes: List[str] = []  # what the config file set that this run cannot keep, said by the run
    if args.resume is not None:
        if args.config is not None:
            raise CSKDError("--resume takes its config from the run directory; drop --config (overrides still apply)")
        cfg = RunDir.open(args.resume).config((*args.overrides, f"output={args.resume}"))
    else:
        cfg = load_config(args.config, args.overrides, notes)
    train(cfg, resume=args.resume is not None, show_progress=not args.no_progress, notes=notes)
    return 0
