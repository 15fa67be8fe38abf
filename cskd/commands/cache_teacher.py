"""``cskd cache-teacher``: run a teacher once over a training split and store its dense logit maps."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

EXAMPLES = """\
examples:
  cskd cache-teacher --out runs/cache-demo                 # the demo config's teacher over its training split
  cskd train teacher.cache=runs/cache-demo                 # then train without running the teacher
  cskd cache-teacher data.unlabeled=/data/unlabelled --out runs/cache-transfer   # the split, then a transfer set
  cskd cache-teacher --config my.yaml --out /data/cache --topk 10 --batch-size 512 --device cuda
  torchrun --nproc-per-node 8 -m cskd cache-teacher --config my.yaml --out /data/cache   # each rank its own shards
  (run the same command again after an interruption: finished shards are kept)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("cache-teacher", help="store a teacher's dense targets once; train from them without the teacher",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the config's teacher over its whole training split (whole images, eval transform) "
                                   "and store each image's dense logit map in float16 shards with a manifest; then once over "
                                   "the validation split, recording its top-1/top-5 there (what student runs report).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for cskd train")
    p.add_argument("--config", type=Path, help="the training config (default: the packaged demo)")
    p.add_argument("--out", type=Path, help="cache folder (default: runs/cache-TEACHER-DATA-SIZEpx)")
    p.add_argument("--topk", type=int, help="keep the k largest logits per cell (default: all classes up to 64, else 10)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file (default 4096)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cskd.config import load_config  # torch: only for this command
    from cskd.teachers import cache_teacher

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"cache-{cfg.teacher.model}-{cfg.data.name}-{cfg.student.img_size}px"
    cache_teacher(cfg, out, args.topk, args.shard_size, args.batch_size, args.device, show_progress=not args.no_progress)
    # the same config and overrides, so the hint trains on the data the cache was made for
    given = " ".join(shlex.quote(o) for o in args.overrides)
    print("next: cskd train" + (f" --config {args.config}" if args.config else "") + (f" {given}" if given else "")
          + f" teacher.cache={out}")
    return 0
