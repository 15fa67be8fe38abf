"""Does CSKD beat its baselines? One teacher, students at one identical budget per method and seed.

Methods (switches of the same loss, run by `cskd train`): no KD, DeiT hard distillation, CSKD
without CKF (``loss.decay=none``), CSKD with linear and with x2 CKF decay, all from one teacher cache
(built once with `cskd cache-teacher`, so every method gets its targets the same way and a run costs
what the student costs), and CSKD linear with the teacher online: the cache's own check. Every run
reports its LAST epoch (no selection on the test split) for every head; the report gives mean and
standard deviation over seeds, the pooled standard deviation, the verdict "best CSKD variant beats
DeiT by more than twice the pooled std" on the fused prediction, JSON, Markdown and a plot.

    python benchmarks/experiment.py --teacher runs/teacher --data fashion-mnist --data-path ../shared/data/fashion-mnist \\
        --epochs 6 --max-train 20000 --seeds 0 1 2 --out experiment
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

CACHED = "teacher.cache={cache}"
METHODS = {
    "no KD": ["loss.deit_type=none", "loss.cskd_type=none", "teacher.cache=null"],
    "DeiT": ["loss.cskd_type=none", CACHED],
    "CSKD, no CKF": ["loss.decay=none", CACHED],
    "CSKD, linear CKF": ["loss.decay=linear", CACHED],
    "CSKD, x2 CKF": ["loss.decay=x2", CACHED],
    "CSKD, linear CKF, online teacher": ["loss.decay=linear", "teacher.cache=null"],
}
HEADS = ("fused", "cls", "dist", "dense")


def cskd(command: str, args: List[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cskd", command, "--no-progress", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def last_metrics(run: Path) -> Dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher run directory or checkpoint")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-path")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-train", type=int, help="a fixed subset of the training split (same for every run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the methods")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--workers", type=int, default=1, help="data-loading workers per run")
    parser.add_argument("--out", type=Path, default=Path("experiment"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. train.device=cuda)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = [f"data.name={args.data}", f"data.workers={args.workers}"] + ([f"data.path={args.data_path}"] if args.data_path else [])
    common = [*data, f"teacher.checkpoint={args.teacher}", f"train.epochs={args.epochs}", *args.extra]
    if args.max_train:
        common.append(f"data.max_train={args.max_train}")
    started = time.time()
    cache = args.out / "teacher-cache"
    if any(CACHED in METHODS[m] for m in args.methods) and not (cache / "manifest.json").exists():
        print("caching the teacher's dense targets", flush=True)
        if cskd("cache-teacher", [*common, "--out", str(cache)], args.out / "cache.log").wait() != 0:
            raise SystemExit(f"cskd cache-teacher failed; see {args.out / 'cache.log'}")
    jobs = [(method, seed) for seed in args.seeds for method in args.methods]
    running: List[tuple] = []
    results: Dict[str, Dict[int, Dict]] = {m: {} for m in args.methods}
    while jobs or running:
        while jobs and len(running) < args.parallel:
            method, seed = jobs.pop(0)
            run = args.out / f"{slug(method)}-seed{seed}"
            if (run / "metrics.jsonl").exists() and last_metrics(run)["epoch"] == args.epochs:
                results[method][seed] = last_metrics(run)  # done by an earlier invocation
                continue
            overrides = [*common, *[o.format(cache=cache) for o in METHODS[method]], f"train.seed={seed}", f"output={run}"]
            running.append((method, seed, run, cskd("train", overrides, run.with_suffix(".log"))))
        time.sleep(2)
        for item in list(running):
            method, seed, run, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode == 0:
                results[method][seed] = last_metrics(run)
                print(f"{method} seed {seed}: fused {results[method][seed]['val_top1_fused']:.2f}% "
                      f"({results[method][seed]['images_per_s']:.0f} img/s, {time.time() - started:.0f} s)", flush=True)
            else:
                print(f"{method} seed {seed} FAILED (see {run.with_suffix('.log')})", flush=True)
    report = summarize(results, args)
    print((args.out / "experiment.md").read_text())
    print(json.dumps(report["verdict"], indent=2))


def summarize(results: Dict[str, Dict[int, Dict]], args) -> Dict:
    summary = {}
    for method, by_seed in results.items():
        if not by_seed:
            continue
        summary[method] = {"seeds": sorted(by_seed),
                           "images_per_s": statistics.mean(m["images_per_s"] for m in by_seed.values())}
        for head in HEADS:
            values = [m.get(f"val_top1_{head}") for m in by_seed.values() if m.get(f"val_top1_{head}") is not None]
            summary[method][head] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                     "values": values}
    pooled = math.sqrt(statistics.mean(s["fused"]["std"] ** 2 for s in summary.values()))
    cskd_methods = [m for m in summary if m.startswith("CSKD")]
    verdict = {"pooled_std": pooled}
    if cskd_methods and "DeiT" in summary:
        best = max(cskd_methods, key=lambda m: summary[m]["fused"]["mean"])
        margin = summary[best]["fused"]["mean"] - summary["DeiT"]["fused"]["mean"]
        verdict.update({"best_cskd": best, "margin_over_deit": margin, "beats_deit_by_2_pooled_std": margin > 2 * pooled})
    report = {"epochs": args.epochs, "data": args.data, "max_train": args.max_train, "teacher": args.teacher,
              "methods": summary, "verdict": verdict}
    (args.out / "experiment.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| method | seeds | fused top-1 | cls | dist | dense-mean | train img/s |", "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        cell = lambda h: f"{s[h]['mean']:.2f} ± {s[h]['std']:.2f}"  # noqa: E731
        lines.append(f"| {method} | {len(s['seeds'])} | **{cell('fused')}** | {cell('cls')} | {cell('dist')} | {cell('dense')} "
                     f"| {s['images_per_s']:.0f} |")
    (args.out / "experiment.md").write_text("\n".join(lines) + f"\n\npooled std (fused): {pooled:.2f}\n")
    plot(summary, args)
    return report


def plot(summary: Dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), [summary[n]["fused"]["mean"] for n in names], yerr=[summary[n]["fused"]["std"] for n in names],
           capsize=6, color="tab:blue", alpha=0.7)
    for i, n in enumerate(names):
        ax.scatter([i] * len(summary[n]["fused"]["values"]), summary[n]["fused"]["values"], color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    low = min(min(summary[n]["fused"]["values"]) for n in names)
    high = max(max(summary[n]["fused"]["values"]) for n in names)
    ax.set(ylabel="fused top-1 (%), last epoch", title=f"{args.data}, {args.epochs} epochs, {len(args.seeds)} seeds, same budget",
           ylim=(low - 1.5, high + 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "experiment.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
