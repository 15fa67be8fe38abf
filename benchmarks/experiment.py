"""Does CSKD beat its baselines? One teacher, then students at an identical budget per method.

Methods (switches of the same loss): no KD, DeiT hard distillation, CSKD without CKF
(``loss.decay=none``) and CSKD (linear CKF). Students start from the packaged demo recipe (nano DeiT
on an 8x8 patch grid, micro ResNet teacher with a 4x4 feature map: the paper's 2:1 grid ratio).
Runs go in parallel processes; the table reports the last epoch's validation top-1 (no selection
on the validation split), mean and standard deviation over seeds, as JSON, Markdown and a PNG.

    python benchmarks/experiment.py --data fashion-mnist --data-path /usr/share/datasets/fashion-mnist \\
        --epochs 10 --seeds 0 1 2 --parallel 4 --out experiment
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

METHODS = {
    "no KD": ["loss.deit_type=none", "loss.cskd_type=none"],
    "DeiT (hard)": ["loss.cskd_type=none"],
    "CSKD, no CKF": ["loss.decay=none"],
    "CSKD": ["loss.decay=linear"],
}
HEADS = ("fused", "cls", "dist", "dense")


def cskd_train(args: List[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cskd", "train", "--no-progress", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def last_metrics(run: Path) -> Dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-path")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher", help="an existing teacher run or checkpoint (skips teacher training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="student runs at a time")
    parser.add_argument("--workers", type=int, default=1, help="data-loading workers per student run")
    parser.add_argument("--teacher-workers", type=int, default=4, help="data-loading workers for the teacher run")
    parser.add_argument("--out", type=Path, default=Path("experiment"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. train.device=cuda)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = [f"data.name={args.data}", f"data.workers={args.workers}"] + ([f"data.path={args.data_path}"] if args.data_path else [])
    started = time.time()

    teacher = args.teacher
    if teacher is None:
        teacher = str(args.out / "teacher")
        print(f"training the teacher for {args.teacher_epochs} epochs", flush=True)
        proc = cskd_train(["--config", "teacher-demo", *data, f"data.workers={args.teacher_workers}",
                           f"train.epochs={args.teacher_epochs}", f"output={teacher}",
                           *args.extra], args.out / "teacher.log")
        if proc.wait() != 0:
            raise SystemExit(f"teacher training failed; see {args.out / 'teacher.log'}")
    teacher_top1 = last_metrics(Path(teacher))["val_top1_global"] if Path(teacher, "metrics.jsonl").exists() else None
    print(f"teacher: {teacher} (top-1 {teacher_top1})", flush=True)

    jobs = [(method, seed) for seed in args.seeds for method in METHODS]
    running: List[tuple] = []
    results: Dict[str, Dict[int, Dict]] = {m: {} for m in METHODS}
    while jobs or running:
        while jobs and len(running) < args.parallel:
            method, seed = jobs.pop(0)
            run = args.out / f"{method.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}-seed{seed}"
            overrides = ["--config", "demo", *data, *METHODS[method], f"train.seed={seed}", f"train.epochs={args.epochs}",
                         f"teacher.checkpoint={teacher}", f"output={run}", *args.extra]
            running.append((method, seed, run, cskd_train(overrides, run.with_suffix(".log"))))
        time.sleep(2)
        for item in list(running):
            method, seed, run, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode == 0:
                    results[method][seed] = last_metrics(run)
                    print(f"{method} seed {seed}: fused {results[method][seed]['val_top1_fused']:.2f}% "
                          f"({time.time() - started:.0f} s)", flush=True)
                else:
                    print(f"{method} seed {seed} FAILED (see {run.with_suffix('.log')})", flush=True)
                write_report(results, teacher_top1, args)


def write_report(results: Dict[str, Dict[int, Dict]], teacher_top1, args) -> None:
    summary = {}
    for method, by_seed in results.items():
        if not by_seed:
            continue
        summary[method] = {"seeds": sorted(by_seed)}
        for head in HEADS:
            values = [m[f"val_top1_{head}"] for m in by_seed.values()]
            summary[method][head] = {"mean": statistics.mean(values),
                                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    report = {"teacher_top1": teacher_top1, "epochs": args.epochs, "data": args.data, "methods": summary}
    (args.out / "experiment.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| method | seeds | fused top-1 | cls | dist | dense-mean |", "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        cell = lambda h: f"{s[h]['mean']:.2f} ± {s[h]['std']:.2f}"  # noqa: E731
        lines.append(f"| {method} | {len(s['seeds'])} | **{cell('fused')}** | {cell('cls')} | {cell('dist')} | {cell('dense')} |")
    lines.append(f"| teacher (micro ResNet) | 1 | {teacher_top1} | | | |")
    (args.out / "experiment.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(summary)
        ax.bar(names, [summary[n]["fused"]["mean"] for n in names], yerr=[summary[n]["fused"]["std"] for n in names],
               capsize=6, color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][: len(names)])
        for i, n in enumerate(names):
            ax.scatter([i] * len(summary[n]["fused"]["values"]), summary[n]["fused"]["values"], color="black", s=12, zorder=3)
        if teacher_top1 is not None:
            ax.axhline(teacher_top1, color="tab:red", linestyle="--", label=f"teacher {teacher_top1:.1f}%")
            ax.legend()
        low = min(min(summary[n]["fused"]["values"]) for n in names)
        ax.set(ylabel="fused top-1 (%)", title=f"{args.data}, {args.epochs} epochs, identical budget", ylim=(low - 2, None))
        fig.tight_layout()
        fig.savefig(args.out / "experiment.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
