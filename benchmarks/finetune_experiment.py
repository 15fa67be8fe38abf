"""Does starting from pretrained weights pay? Pretrain on one half of Fashion-MNIST, fine-tune on few labels of the other.

The protocol (every step a plain `cskd` command on image folders, as a user's own data would be):

1. ``folders``: Fashion-MNIST written as two image-folder trees: ``pretrain/`` holds classes 0-4
   (T-shirt/top, Trouser, Pullover, Dress, Coat; all 30,000 training images, their 5,000 test
   images as val/), ``fewlabel/`` holds classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot; a
   seeded ``--per-class`` training images each, all 5,000 test images as val/). No image and no
   class is shared between the two.
2. ``pretrain``: the demo teacher (RegNetY-016) and the demo student (no distillation) trained on
   ``pretrain/``, side by side.
3. ``teacher``: the teacher fine-tuned on ``fewlabel/`` from its pretraining (``teacher.init``,
   packaged ``finetune-teacher`` recipe), then its dense targets cached.
4. ``students``: the student distilled with CSKD from that teacher on ``fewlabel/``, once from its
   pretraining (``student.init``, packaged ``finetune`` recipe) and once from scratch (the demo
   recipe), at each budget of ``--epochs``, same teacher, per seed. Each run checks a fixed 1,000 val
   images per epoch; its last epoch is scored on all 5,000 with `cskd eval`.

    python benchmarks/finetune_experiment.py --data-path ../shared/data/fashion-mnist --out runs/finetune \\
        --seeds 1 2 3 --epochs 15 30 60

``--arms`` adds the probes that chose the recipe (seed 0, 60 epochs; docs/benchmarks.md).
Prints a table, writes finetune.json, finetune.md and finetune.png (--tag) to --out. Steps already done in
--out are skipped, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from experiment import cskd, last_metrics, slug  # benchmarks/experiment.py: the same `cskd` subprocess and run reading

PRETRAIN_CLASSES, FEWLABEL_CLASSES = range(0, 5), range(5, 10)
# the packaged fine-tuning recipes at the demo's model sizes: the demo student and teacher at 32 px, and
# the recipes' rule for the student's rate, a quarter of the from-scratch rate (demo.yaml's 2e-2); the
# teacher recipe's 1.5e-3 is already a quarter of teacher-demo.yaml's 6e-3
DEMO_STUDENT = ["student.model=cskd_deit_nano_distilled_patch4_32", "student.img_size=32", "student.patch_size=4",
                "data.eval_crop_pct=1.0", "teacher.model=regnety_016", "train.lr=5e-3"]
DEMO_TEACHER = ["teacher.model=regnety_016", "teacher.kwargs={output_stride: 8}", "student.img_size=32",
                "data.eval_crop_pct=1.0"]
INIT = "student.init={init}"
# what the first draft of the recipe had: DeiT-like augmentation and schedule (it lost 3-5 points here)
HEAVIER = ["data.scale=[0.35,1.0]", "student.drop_path=0.1", "train.warmup_epochs=2", "train.min_lr=1e-6"]
ARMS = {  # name: (config, overrides); {init} is the pretrained student run
    "from scratch": ("demo", []),
    "from pretrained": ("finetune", [*DEMO_STUDENT, INIT]),
    # probes that chose the recipe (seed 0, 60 epochs): the rate, the augmentation, layer-wise decay
    "from pretrained, demo recipe": ("demo", [INIT]),
    "from pretrained, demo recipe at a quarter of its rate": ("demo", ["train.lr=5e-3", INIT]),
    "from pretrained, heavier augmentation": ("finetune", [*DEMO_STUDENT, *HEAVIER, INIT]),
    "from pretrained, heavier augmentation at the demo rate": ("finetune", [*DEMO_STUDENT, *HEAVIER, "train.lr=2e-2", INIT]),
    "from pretrained, heavier augmentation, lr / 16": ("finetune", [*DEMO_STUDENT, *HEAVIER, "train.lr=1.25e-3", INIT]),
    "from pretrained, heavier augmentation, layer decay 0.75": ("finetune", [*DEMO_STUDENT, *HEAVIER, "train.layer_decay=0.75", INIT]),
    "from scratch, heavier augmentation at the demo rate": ("finetune", [*DEMO_STUDENT, *HEAVIER, "train.lr=2e-2"]),
}


def write_folders(data_path: str, out: Path, per_class: int, seed: int) -> None:
    """The two image-folder trees of the protocol (PNG, one folder per class)."""
    from PIL import Image

    from cskd.data.datasets import FASHION_MNIST_CLASSES
    from cskd.data.idx import read_idx_split

    rng = np.random.default_rng(seed)
    splits = {"train": read_idx_split(data_path, "train"), "val": read_idx_split(data_path, "t10k")}
    for tree, classes, limit in (("pretrain", PRETRAIN_CLASSES, None), ("fewlabel", FEWLABEL_CLASSES, per_class)):
        for split, (images, labels) in splits.items():
            for label in classes:
                indices = np.flatnonzero(labels == label)
                if split == "train" and limit is not None:
                    indices = np.sort(rng.choice(indices, size=limit, replace=False))
                folder = out / tree / split / f"{label}-{FASHION_MNIST_CLASSES[label].replace('/', '-')}"
                folder.mkdir(parents=True, exist_ok=True)
                for index in indices:
                    Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    (out / "folders.json").write_text(json.dumps({"per_class": per_class, "seed": seed}) + "\n")


def done(run: Path, epochs: int) -> bool:
    return (run / "metrics.jsonl").exists() and last_metrics(run)["epoch"] == epochs


def run_all(jobs: List[tuple], parallel: int) -> None:
    """Run ``(name, command, args, run_dir, epochs)`` jobs, ``parallel`` at a time; skip finished ones."""
    jobs = [job for job in jobs if not done(job[3], job[4])]
    running: List[tuple] = []
    while jobs or running:
        while jobs and len(running) < parallel:
            name, command, args, run, _ = job = jobs.pop(0)
            run.parent.mkdir(parents=True, exist_ok=True)
            print(f"  {name}: cskd {command} {' '.join(args)}", flush=True)
            running.append((job, time.time(), cskd(command, args, run.with_suffix(".log"))))
        time.sleep(2)
        for item in list(running):
            (name, _, _, run, _), started, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed; see {run.with_suffix('.log')}")
            run.with_suffix(".wall_s").write_text(f"{time.time() - started:.0f}\n")
            print(f"  {name}: done in {time.time() - started:.0f} s", flush=True)


def full_val(run: Path) -> Dict[str, float]:
    """The run's last epoch on its whole validation split (runs check a fixed 1,000 of it each epoch)."""
    scored = run / "val-full.json"
    if not scored.exists():
        args = [str(run / "last.safetensors"), "--workers", "0", "--json", str(scored)]
        if cskd("eval", args, run / "val-full.log").wait() != 0:
            raise SystemExit(f"cskd eval failed; see {run / 'val-full.log'}")
    return json.loads(scored.read_text())["top1"]


def summarize(args, results: Dict[tuple, Dict[int, Dict]]) -> Dict:
    """``results[(arm, epochs)][seed]``: the run's top-1 per head on the whole validation split."""
    summary: Dict[str, Dict] = {}
    for (arm, epochs), by_seed in results.items():
        fused = [by_seed[s]["fused"] for s in sorted(by_seed)]
        summary[label(arm, epochs)] = {
            "arm": arm, "epochs": epochs, "seeds": sorted(by_seed), "fused": fused, "mean": statistics.mean(fused),
            "std": statistics.stdev(fused) if len(fused) > 1 else 0.0,
            "heads": {h: statistics.mean(by_seed[s][h] for s in by_seed) for h in ("cls", "dist", "dense")}}
    gains = {epochs: summary[label("from pretrained", epochs)]["mean"] - summary[label("from scratch", epochs)]["mean"]
             for epochs in args.epochs if label("from pretrained", epochs) in summary and label("from scratch", epochs) in summary}
    teacher_runs = {"teacher-pretrain": args.teacher_pretrain_epochs, "teacher-fewlabel": args.teacher_epochs}
    teachers = {name: full_val(args.out / name)["global"] for name, epochs in teacher_runs.items() if done(args.out / name, epochs)}
    report = {"per_class": args.per_class, "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
              "teacher_epochs": args.teacher_epochs, "teachers": teachers, "arms": summary,
              "gain_by_epochs": gains, "goal_5_points_by_epochs": {e: g >= 5.0 for e, g in gains.items()}}
    (args.out / f"{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| student | epochs | seeds | fused top-1 per seed | mean ± std | cls | dist | dense |", "|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        per_seed, heads = " / ".join(f"{v:.2f}" for v in s["fused"]), " | ".join(f"{s['heads'][h]:.2f}" for h in ("cls", "dist", "dense"))
        lines.append(f"| {s['arm']} | {s['epochs']} | {', '.join(map(str, s['seeds']))} | {per_seed} | "
                     f"**{s['mean']:.2f} ± {s['std']:.2f}** | {heads} |")
    lines.append("")
    lines.append("teachers (top-1, whole val split of their classes): " + ", ".join(f"{k} {v:.2f}" for k, v in teachers.items()))
    for epochs, gain in gains.items():
        lines.append(f"\n{epochs} epochs: pretrained - scratch {gain:+.2f} points fused (goal >= 5: {'met' if gain >= 5 else 'not met'})")
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    plot(args, summary)
    return report


def plot(args, summary: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, curve) = plt.subplots(1, 2, figsize=(11, 5.5))
    arms = list(dict.fromkeys(s["arm"] for s in summary.values()))
    budgets = sorted({s["epochs"] for s in summary.values()})
    colors = dict(zip(arms, plt.cm.tab10.colors))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, epochs in enumerate(budgets):
            s = summary.get(label(arm, epochs))
            if s is None:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, s["mean"], width, yerr=s["std"], capsize=4, alpha=0.7, color=colors[arm], label=arm if i == 0 else None)
            ax.scatter([x] * len(s["fused"]), s["fused"], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(budgets)), [f"{e} epochs" for e in budgets])
    low, high = min(v for s in summary.values() for v in s["fused"]), max(v for s in summary.values() for v in s["fused"])
    ax.set(ylabel="fused top-1 (%), last epoch, all 5,000 val", title=f"classes 5-9, {args.per_class} labels per class",
           ylim=(low - 5, high + 2))
    ax.grid(axis="y", alpha=0.3)
    longest = budgets[-1]
    for arm in arms:
        s = summary.get(label(arm, longest))
        for seed in (s or {}).get("seeds", []):
            rows = [json.loads(line) for line in (args.out / run_name(arm, longest, seed) / "metrics.jsonl").read_text().splitlines()]
            curve.plot([r["epoch"] for r in rows], [r["val_top1_fused"] for r in rows], color=colors[arm], alpha=0.6,
                       label=arm if seed == s["seeds"][0] else None)
    curve.set(xlabel="epoch", ylabel="fused top-1 (%)", title=f"{longest}-epoch runs: validation (a fixed 1,000) per epoch")
    curve.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()  # one legend for both: the arms' colours
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(names) + 1) // 2), 1, 1))
    fig.savefig(args.out / f"{args.tag}.png", dpi=100)
    plt.close(fig)


def label(arm: str, epochs: int) -> str:
    return f"{arm}, {epochs} epochs"


def run_name(arm: str, epochs: int, seed: int) -> str:
    return f"student-{slug(arm).replace('_', '-')}-e{epochs}-seed{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="a Fashion-MNIST IDX folder (train and t10k files)")
    parser.add_argument("--out", type=Path, default=Path("finetune"))
    parser.add_argument("--per-class", type=int, default=100, help="labelled training images per class of classes 5-9")
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="student pretraining epochs on classes 0-4")
    parser.add_argument("--teacher-pretrain-epochs", type=int, default=2, help="teacher pretraining epochs on classes 0-4")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher fine-tuning epochs on the few labels")
    parser.add_argument("--epochs", type=int, nargs="+", default=[15, 30, 60],
                        help="student budgets on the few labels, in epochs (every arm at each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seed 0 chose the recipe (the probes)")
    parser.add_argument("--arms", nargs="+", default=["from scratch", "from pretrained"], choices=list(ARMS), metavar="ARM",
                        help="student arms (default: the two the goal compares): " + "; ".join(ARMS))
    parser.add_argument("--tag", default="finetune", help="name of the report files (TAG.json, TAG.md, TAG.png)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every student run")
    parser.add_argument("--report", action="store_true", help="only summarise the runs already finished in --out")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["data.name=imagefolder", "data.channels=1", "data.workers=1", f"train.threads={args.threads}",
              "data.max_val=1000"]  # each epoch's check; the last epoch is scored on all 5,000 (full_val)
    pretrain, fewlabel = [f"data.path={out / 'data' / tree}" for tree in ("pretrain", "fewlabel")]
    if not args.report:
        if not (out / "data" / "folders.json").exists():
            print("writing the image folders", flush=True)
            write_folders(args.data_path, out / "data", args.per_class, seed=0)
        print("pretraining on classes 0-4", flush=True)
        run_all([("teacher pretraining", "train", ["--config", "teacher-demo", *common, pretrain,
                                                   f"train.epochs={args.teacher_pretrain_epochs}", f"output={out / 'teacher-pretrain'}"],
                  out / "teacher-pretrain", args.teacher_pretrain_epochs),
                 ("student pretraining", "train", ["--config", "demo", *common, pretrain, "loss.deit_type=none", "loss.cskd_type=none",
                                                   "teacher.checkpoint=null", "teacher.cache=null",
                                                   f"train.epochs={args.pretrain_epochs}", f"output={out / 'student-pretrain'}"],
                  out / "student-pretrain", args.pretrain_epochs)], args.parallel)
        print("fine-tuning the teacher on the few labels", flush=True)
        teacher_args = ["--config", "finetune-teacher", *common, *DEMO_TEACHER, fewlabel, f"teacher.init={out / 'teacher-pretrain'}",
                        f"train.threads={args.parallel * args.threads}", f"train.epochs={args.teacher_epochs}",
                        f"output={out / 'teacher-fewlabel'}"]  # alone on the machine: every thread
        run_all([("teacher fine-tuning", "train", teacher_args, out / "teacher-fewlabel", args.teacher_epochs)], 1)
        cache = out / "teacher-fewlabel-cache"
        if not (cache / "manifest.json").exists():
            print("caching the teacher's dense targets", flush=True)
            cache_args = ["--config", "finetune", *common, *DEMO_STUDENT, fewlabel, f"teacher.checkpoint={out / 'teacher-fewlabel'}",
                          f"train.threads={args.parallel * args.threads}", "--out", str(cache)]  # the README's command
            if cskd("cache-teacher", cache_args, out / "cache.log").wait() != 0:
                raise SystemExit(f"cskd cache-teacher failed; see {out / 'cache.log'}")
    students = []
    for seed in args.seeds:
        for epochs in sorted(args.epochs, reverse=True):  # the longest first: the pairs that share the cores end together
            for arm in args.arms:
                config, overrides = ARMS[arm]
                run = out / run_name(arm, epochs, seed)
                students.append((f"{label(arm, epochs)}, seed {seed}", "train", [
                    "--config", config, *common, fewlabel, *[o.format(init=out / "student-pretrain") for o in overrides],
                    f"teacher.checkpoint={out / 'teacher-fewlabel'}", f"teacher.cache={out / 'teacher-fewlabel-cache'}",
                    f"train.epochs={epochs}", f"train.seed={seed}", *args.extra, f"output={run}"], run, epochs))
    if not args.report:
        print("students on the few labels", flush=True)
        run_all(students, args.parallel)
    results: Dict[tuple, Dict[int, Dict]] = {}
    for seed in args.seeds:
        for epochs in args.epochs:
            for arm in args.arms:
                if done(out / run_name(arm, epochs, seed), epochs):
                    results.setdefault((arm, epochs), {})[seed] = full_val(out / run_name(arm, epochs, seed))
    report = summarize(args, results)
    print((out / f"{args.tag}.md").read_text())
    print(json.dumps({"gain_by_epochs": report["gain_by_epochs"]}))


if __name__ == "__main__":
    main()
