"""The accuracy frontier a `cskd plan` buys: candidates trained at equal training time, accuracy against
engine latency, and whether the plan's proxy ranking (a few epochs) orders them as the full budget does.

    python benchmarks/plan_frontier.py runs/plan-proxy/plan.json \\
        nano-w96-d4-h3-p4=runs/demo nano-w96-d8-h3-p4=runs/frontier/w96-d8 ... \\
        --proxy nano-w96-d8-h3-p4=runs/plan-proxy/proxy/nano-w96-d8-h3-p4 --out docs/results/frontier

The plan (run with --proxy-epochs) gives each candidate's latency, FLOPs, proxy top-1 and seconds per
epoch; each LABEL=RUN is that candidate trained at the config student's training time (`cskd plan`'s
equal-time epochs). --proxy LABEL=RUN adds a proxy run for a candidate the plan did not train (outside
its budget in that run).
Accuracy is the fused top-1 at the last epoch (what a run deploys). Ranking agreement is Kendall's
tau-b between proxy and full top-1. Writes OUT/frontier.json, OUT/frontier.md and OUT/frontier.png.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path
from typing import Dict, Sequence

from cskd.measure.plan import epoch_seconds
from cskd.run import RunDir


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two rankings: (concordant - discordant) pairs over the geometric mean of the pairs
    untied in each; 1 = the same order, -1 = reversed."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    untied_x, untied_y = concordant + discordant + tied_y, concordant + discordant + tied_x
    return (concordant - discordant) / (untied_x * untied_y) ** 0.5 if untied_x and untied_y else float("nan")


def pairs(values: Sequence[str], what: str) -> Dict[str, Path]:
    out = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"{what} takes LABEL=PATH, got {value!r}")
        out[label] = Path(path)
    return out


def run_figures(run: Path) -> Dict:
    rows = RunDir(run).metrics()
    if not rows:
        raise SystemExit(f"{run} has no metrics.jsonl: pass a finished run directory")
    return {"run": str(run), "epochs": int(rows[-1]["epoch"]), "top1": float(rows[-1]["val_top1_fused"]),
            "best_top1": max(float(r["val_top1_fused"]) for r in rows), "wall_s": float(rows[-1].get("time_s", 0.0)),
            "epoch_s": epoch_seconds(rows)}


def frontier(plan: Dict, full: Dict[str, Path], proxies: Dict[str, Path]) -> Dict:
    candidates = {c["label"]: c for c in plan["candidates"]}
    rows = []
    for label, run in full.items():
        if label not in candidates:
            raise SystemExit(f"{label} is not a candidate of the plan ({', '.join(candidates)})")
        c = candidates[label]
        proxy_top1, proxy_epochs, proxy_epoch_s = c.get("proxy_top1"), c.get("proxy_epochs"), c.get("epoch_s")
        if label in proxies:
            proxy = run_figures(proxies[label])
            proxy_top1, proxy_epochs, proxy_epoch_s = proxy["best_top1"], proxy["epochs"], proxy["epoch_s"]
        if proxy_top1 is not None and proxy_epochs is None:  # a plan from before proxies recorded their epochs: all the same
            proxy_epochs = plan["options"]["proxy_epochs"]
        rows.append({"label": label, "params": c["params"], "flops": c["flops"], "b1_ms": c["p50_ms"]["1"],
                     "speedup": c["speedup"]["1"], "proxy_top1": proxy_top1, "proxy_epochs": proxy_epochs, "proxy_epoch_s": proxy_epoch_s,
                     "equal_time_epochs": c.get("equal_time_epochs"), **{f"full_{k}": v for k, v in run_figures(run).items()}})
    ranked = [r for r in rows if r["proxy_top1"] is not None]
    tau = kendall_tau_b([r["proxy_top1"] for r in ranked], [r["full_top1"] for r in ranked]) if len(ranked) > 1 else None
    teacher = plan["teacher"]
    return {"plan": plan["out"], "budget_ms": plan["budget"]["latency_ms"], "min_speedup": plan["budget"]["min_speedup"],
            "target": plan["target"],
            "proxy_epochs": plan["options"]["proxy_epochs"], "proxy_schedule": plan["options"].get("proxy_schedule", "epochs"),
            "teacher": {"label": teacher["label"], "b1_ms": teacher["p50_ms"]["1"], "top1": plan.get("teacher_top1")},
            "rows": sorted(rows, key=lambda r: r["b1_ms"]), "kendall_tau_b": tau, "ranked": len(ranked)}


def markdown(result: Dict) -> str:
    lines = ["| candidate | params | GFLOPs | int8 b1 ms | speedup | proxy top-1 | epochs | full top-1 (last) | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: -r["full_top1"]):
        proxy = f"{r['proxy_top1']:.2f} ({r['proxy_epochs']} ep)" if r["proxy_top1"] is not None else "-"
        minutes, seconds = divmod(int(round(r["full_wall_s"])), 60)
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['flops'] / 1e9:.3f} | {r['b1_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{proxy} | {r['full_epochs']} | {r['full_top1']:.2f} | {minutes}m{seconds:02d}s |")
    tau = result["kendall_tau_b"]
    lines.append("")
    lines.append(f"Kendall tau-b, proxy ({result['proxy_epochs']} epochs of the config's student, schedule "
                 f"{result['proxy_schedule']}) against full top-1 over {result['ranked']} candidates: "
                 + (f"{tau:.2f}" if tau is not None else "-"))
    return "\n".join(lines)


def plot(result: Dict, teacher_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.scatter([r["b1_ms"] for r in rows], [r["full_top1"] for r in rows], color="tab:blue", zorder=3, label="students, equal time")
    for r in rows:
        left.annotate(f"{r['label']}\n{r['full_epochs']} ep", (r["b1_ms"], r["full_top1"]), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    left.scatter([result["teacher"]["b1_ms"]], [teacher_top1], marker="*", s=160, color="tab:red", zorder=3, label="teacher")
    if result["budget_ms"]:
        speedup = f", {result['min_speedup']:g}x the teacher" if result["min_speedup"] else ""
        left.axvline(result["budget_ms"], color="grey", linestyle="--", label=f"budget ({result['budget_ms']:.2f} ms{speedup})")
    left.set_xscale("log")
    left.set_xlabel(f"engine latency, batch 1, {result['target']['precision']} (ms, log)")
    left.set_ylabel("validation top-1, fused, last epoch (%)")
    left.set_title("accuracy at the demo's training time")
    left.legend(fontsize=8, loc="upper center")
    ranked = [r for r in rows if r["proxy_top1"] is not None]
    right.scatter([r["proxy_top1"] for r in ranked], [r["full_top1"] for r in ranked], color="tab:green", zorder=3)
    for r in ranked:
        right.annotate(r["label"], (r["proxy_top1"], r["full_top1"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    right.set_xlabel(f"proxy top-1 (%): the time of {result['proxy_epochs']} epochs of the config's student each"
                     if result["proxy_schedule"] == "time" else f"proxy top-1 after {result['proxy_epochs']} epochs (%)")
    right.set_ylabel("full top-1 at equal time (%)")
    tau = result["kendall_tau_b"]
    right.set_title(f"proxy ranking against full: Kendall tau-b {tau:.2f}" if tau is not None else "proxy ranking")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path, help="plan.json of `cskd plan --proxy-epochs N`")
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR: the candidate trained at equal training time")
    parser.add_argument("--proxy", nargs="*", default=[], help="LABEL=RUN_DIR: a proxy run the plan did not make")
    parser.add_argument("--teacher-top1", type=float, required=True, help="the teacher's validation top-1 (%%)")
    parser.add_argument("--out", type=Path, default=Path("frontier"))
    args = parser.parse_args()
    result = frontier(json.loads(args.plan.read_text()), pairs(args.runs, "runs"), pairs(args.proxy, "--proxy"))
    result["teacher"]["top1"] = args.teacher_top1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / "frontier.md").write_text(text + "\n")
    plot(result, args.teacher_top1, args.out / "frontier.png")
    print(text)
    print(f"wrote {args.out}/frontier.json, frontier.md, frontier.png")


if __name__ == "__main__":
    main()
