"""When does CSKD pay? Student accuracy against the teacher's, per method, from `benchmarks/experiment.py` runs
with teachers of different strength, and the distillation guard replayed on every run that kept its epochs.

    python benchmarks/teacher_curve.py runs/curve/students-10k-e2 runs/curve/students-60k-e1 \\
        runs/curve/students-60k-e3 docs/results/experiment-demo --out runs/curve

Each folder is one teacher's experiment (experiment.json). The teacher's top-1 on the demo's validation
images comes from the folder's teacher cache (`cskd cache-teacher` measures it), or from the packaged
cache for the packaged teacher. Students are read at their last epoch (fused prediction), as
experiment.py reports them; "no KD" does not depend on the teacher and is drawn as a band. The guard
(cskd.guard.judge_run) is replayed at several margins on every run directory still present: which runs
it fires on, at which epoch. Writes OUT/curve.json, OUT/curve.md and OUT/curve.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from cskd.assets import DEMO_TEACHER_CACHE, asset_path
from cskd.guard import CLS_ABOVE_TEACHER, judge_run

MARGINS = (0.5, 1.0, 2.0, 3.0, 5.0)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def teacher_top1(folder: Path, experiment: Dict) -> float:
    cache = folder / "teacher-cache" / "manifest.json"
    if experiment.get("teacher") == "demo" or not cache.exists():
        cache = asset_path(DEMO_TEACHER_CACHE) / "manifest.json"
    return float(json.loads(cache.read_text())["teacher_val_top1"])


def verdict_label(verdict) -> Optional[str]:
    """"above@9": the class token overtook the teacher at epoch 9; "trail@6": the taught heads trailed it."""
    if verdict is None:
        return None
    return f"{'above' if verdict.reason == CLS_ABOVE_TEACHER else 'trail'}@{verdict.epoch}"


def guard_replays(folder: Path, method: str, seeds: List[int], top1: float) -> Dict[str, Dict[str, Optional[str]]]:
    """Per seed whose run directory is present: the guard's first verdict at each margin ("reason@epoch") or None."""
    replays = {}
    for seed in seeds:
        run = folder / f"{slug(method)}-seed{seed}"
        if (run / "metrics.jsonl").exists() and method != "no KD":
            replays[str(seed)] = {f"{m:g}": verdict_label(judge_run(run, teacher_top1=top1, margin=m)) for m in MARGINS}
    return replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", type=Path, nargs="+", help="experiment.py output folders, one teacher each")
    parser.add_argument("--out", type=Path, default=Path("curve"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    points: List[Dict] = []
    for folder in args.experiments:
        experiment = json.loads((folder / "experiment.json").read_text())
        top1 = teacher_top1(folder, experiment)
        for method, result in experiment["methods"].items():
            if method not in ("no KD", "DeiT", "CSKD, linear CKF"):
                continue
            values = result["fused"]["values"]
            points.append({"teacher": folder.name, "teacher_top1": top1, "method": method, "seeds": result["seeds"], "fused": values,
                           "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                           "cls": result["cls"]["values"], "guard": guard_replays(folder, method, result["seeds"], top1)})
    points.sort(key=lambda p: (p["teacher_top1"], p["method"]))
    lines = ["| teacher top-1 | method | seeds | fused top-1 (last epoch) | cls | guard at margin 0.5 / 1 / 2 / 3 / 5 |",
             "|---|---|---|---|---|---|"]
    for p in points:
        spread = f" ± {p['std']:.2f}" if p["std"] is not None else ""
        guard = "; ".join(f"seed {s}: " + " / ".join(v or "-" for v in by_margin.values()) for s, by_margin in p["guard"].items())
        lines.append(f"| {p['teacher_top1']:.2f} | {p['method']} | {len(p['seeds'])} | {p['mean']:.2f}{spread} | "
                     f"{statistics.fmean(p['cls']):.2f} | {guard or 'no run directory kept'} |")
    lines.append("\nguard: trail@E = the taught heads trailed the class token by more than the margin at epoch E; "
                 "above@E = the class token overtook the teacher; - = never fired")
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    (args.out / "curve.json").write_text(json.dumps(points, indent=1))
    print("\n".join(lines))
    plot(points, args.out / "curve.png")


def plot(points: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    no_kd = [v for p in points if p["method"] == "no KD" for v in p["fused"]]
    if no_kd:
        mean, std = statistics.fmean(no_kd), statistics.stdev(no_kd) if len(no_kd) > 1 else 0.0
        ax.axhspan(mean - std, mean + std, color="0.85", label=f"no KD ({mean:.1f} ± {std:.1f}, {len(no_kd)} seeds)")
        ax.axhline(mean, color="0.5", lw=1)
    for method, color in (("DeiT", "tab:blue"), ("CSKD, linear CKF", "tab:red")):
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        ax.errorbar([p["teacher_top1"] for p in mine], [p["mean"] for p in mine], yerr=[p["std"] or 0 for p in mine],
                    marker="o", capsize=3, color=color, label=method)
        for p in mine:
            ax.scatter([p["teacher_top1"]] * len(p["fused"]), p["fused"], color=color, s=8, alpha=0.5)
    lo = min(p["teacher_top1"] for p in points)
    ax.plot([lo - 1, 93], [lo - 1, 93], ls=":", color="k", lw=0.8, label="student = teacher")
    ax.set_xlabel("teacher top-1 on the demo's validation images (%)")
    ax.set_ylabel("student top-1, fused, last epoch (%)")
    ax.set_title("when does distillation pay? (the demo's data and budget)")
    ax.set_ylim(min(p["mean"] for p in points) - 3, max(p["mean"] for p in points) + 3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
