"""Package a trained teacher as cskd's embedded demo teacher, with its targets for the embedded split.

    cskd train --config teacher-demo output=runs/teacher-demo          # (see cskd/configs/teacher-demo.yaml)
    python scripts/package_demo_teacher.py runs/teacher-demo

Writes cskd/assets/teacher_fashion_mnist_demo.safetensors: the run's best weights with every
matrix and convolution kernel stored in float16 (half the bytes; BatchNorm statistics and biases
stay float32), its spec, and in its info the top-1 it reaches ON THE EMBEDDED VALIDATION SPLIT
(what `cskd eval` reproduces; the run itself may have validated on other data). Then caches the
teacher's dense targets for the embedded training split in
cskd/assets/teacher_cache_fashion_mnist_demo/ (`teacher.cache=demo`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from cskd.assets import DEMO_TEACHER, DEMO_TEACHER_CACHE, asset_path
from cskd.checkpoint import load_weights, resolve_checkpoint, save_weights
from cskd.config import load_config
from cskd.evaluate import run_eval
from cskd.teachers import cache_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the teacher's run directory (or checkpoint)")
    args = parser.parse_args()
    source = resolve_checkpoint(args.run)
    tensors, spec, info = load_weights(source)
    half = {k: (v.half() if v.is_floating_point() and v.ndim >= 2 else v) for k, v in tensors.items()}
    target = asset_path(DEMO_TEACHER)
    staging = target.with_suffix(".tmp.safetensors")
    save_weights(staging, half, spec, {"epoch": info.get("epoch"), "trained_on": str(source)})
    full = run_eval(source, data_name="fashion-mnist-demo", show_progress=False)["top1"]["global"]
    packed = run_eval(staging, data_name="fashion-mnist-demo", show_progress=False)["top1"]["global"]
    print(f"embedded validation top-1: {full:.2f}% (float32 weights), {packed:.2f}% (float16 weights)")
    if abs(full - packed) > 0.2:
        staging.unlink()
        sys.exit("float16 storage costs more than 0.2 points; keep float32")
    save_weights(target, half, spec, {"epoch": info.get("epoch"), "val_top1": packed,
                                      "val_split": "fashion-mnist-demo (embedded, 2,000 images)",
                                      "source_val_top1": info.get("val_top1")})
    staging.unlink()
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    cache = asset_path(DEMO_TEACHER_CACHE)
    shutil.rmtree(cache, ignore_errors=True)
    cfg = load_config(None, ["data.workers=2"])  # the demo config: the embedded data, teacher.checkpoint=demo
    manifest = cache_teacher(cfg, cache, shard_size=10000, show_progress=False)
    manifest.teacher["checkpoint"] = "demo"  # not this machine's path
    manifest.write(cache)
    size = sum(p.stat().st_size for p in cache.iterdir())
    print(f"wrote {cache} ({size / 1e6:.1f} MB): {json.dumps(manifest.identity())}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
