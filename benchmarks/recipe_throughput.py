"""Whole-run training throughput of recipes: `cskd train` as a user runs it, loader workers included.

``train_throughput.py`` times the training step on synthetic batches; this times what an augmentation
recipe adds where it runs, in the loader's workers (``data.workers``), by running the real command for
a few epochs per arm, the arms interleaved round by round (A B C A B C ...) so that the machine's drift
hits each alike. Each arm's figure is the median over rounds of its epochs' training images/s (as
``metrics.jsonl`` records them, validation excluded); ratios are against the first arm. Prints a table
and writes JSON.

    python benchmarks/recipe_throughput.py                                 # today's demo, the cached
                                                                           # tone recipe, its live arm
    python benchmarks/recipe_throughput.py --arm today= --arm ra=data.auto_augment=rand-m9-mstd0.5-inc1 \
        --epochs 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from cskd.files import atomic_write_json
from cskd.measure import machine

DEFAULT_ARMS = (
    "today=",
    "tone=data.invariance=tone",
    "tone-live=data.invariance=tone teacher.cache=null",
)


def parse_arm(text: str) -> tuple[str, List[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--arm {text!r}: write NAME=OVERRIDES, e.g. ra=data.auto_augment=rand-m9 (or NAME= for none)")
    return name, shlex.split(overrides)


def run_arm(overrides: List[str], epochs: int, folder: Path) -> Dict[str, float]:
    command = [sys.executable, "-m", "cskd", "train", *overrides, f"train.epochs={epochs}", f"output={folder}",
               "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    epochs_seen = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"images_per_s": statistics.median(e["images_per_s"] for e in epochs_seen), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", help="NAME=OVERRIDES (repeatable; default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--json", type=Path, default=Path("recipe_throughput.json"))
    args = parser.parse_args()
    arms = dict(parse_arm(a) for a in (args.arm or DEFAULT_ARMS))

    rounds: Dict[str, List[Dict[str, float]]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="cskd-recipe-bench-") as tmp:
        for r in range(args.rounds):
            for name, overrides in arms.items():
                figures = run_arm(overrides, args.epochs, Path(tmp) / f"{name}-{r}")
                rounds[name].append(figures)
                print(f"round {r + 1}/{args.rounds} {name:<18} {figures['images_per_s']:8.1f} img/s "
                      f"{figures['wall_s']:6.1f} s", flush=True)

    first = next(iter(arms))
    median = {name: {k: statistics.median(f[k] for f in rs) for k in ("images_per_s", "wall_s")}
              for name, rs in rounds.items()}
    # Ratio per round, then the median: a drift between rounds cancels within each pair.
    ratio = {name: statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in zip(rs, rounds[first]))
             for name, rs in rounds.items()}
    result = {"machine": machine.describe(), "epochs": args.epochs, "rounds": args.rounds,
              "arms": {n: " ".join(o) for n, o in arms.items()}, "median": median, "ratio_to_first": ratio,
              "all_rounds": rounds}
    print(f"\non {machine.one_line(result['machine'])}, {args.epochs} epoch(s) per run, {args.rounds} rounds")
    print(f"{'arm':<18} {'train img/s':>12} {'vs ' + first:>12} {'run wall s':>11}")
    for name in arms:
        print(f"{name:<18} {median[name]['images_per_s']:>12.1f} {ratio[name]:>11.2f}x {median[name]['wall_s']:>11.1f}")
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
