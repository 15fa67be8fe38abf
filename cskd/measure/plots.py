"""PNG plots of what measurement measures: package latency and accuracy (``cskd bench``), engine
against served speedups (``--served``), and the candidates of a plan (``cskd plan``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from cskd.plots import pyplot, save_figure


def plot_bench(result: Dict[str, Any], folder: Path) -> List[Path]:
    """``latency.png`` (p50 against batch size) and, when top-1 was measured, ``accuracy_latency.png``
    of a ``cskd bench`` result."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in models:
        rows = [r for r in result["rows"] if r["model"] == model]
        ax.plot([r["batch"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label=model)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)", title="latency against batch size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [folder / "latency.png", folder / "accuracy_latency.png"]
    save_figure(fig, paths[0])
    smallest = min(r["batch"] for r in result["rows"])
    scored = [r for r in result["rows"] if r["batch"] == smallest and r["top1"] is not None]
    if not scored:  # latency only (--eval-images 0): no accuracy to plot
        return paths[:1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in scored:
        ax.scatter(r["p50_ms"], r["top1"], s=60, marker="s" if r["role"] == "teacher" else "o")
        ax.annotate(r["model"], (r["p50_ms"], r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel=f"p50 latency at batch {smallest} (ms)", ylabel="top-1 (%)", title="accuracy against latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, paths[1])
    return paths


def plot_served(rows: List[Dict[str, Any]], path: Path) -> Path:
    """``served.png``: each student's speedup over the teacher as its engine measures it and as served,
    side by side per concurrency (the rows of a ``cskd bench --served`` result)."""
    plt = pyplot()
    students = [r for r in rows if r["role"] != "teacher"]
    labels = [f"{r['model'].split(' (')[0]}\nc{r['concurrency']} (engine b{r['engine_batch']})" for r in students]
    x = range(len(students))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(students)), 4))
    ax.bar([i - 0.2 for i in x], [r["engine_speedup"] for r in students], 0.4, label="engine (cskd bench)")
    ax.bar([i + 0.2 for i in x], [r["served_speedup"] for r in students], 0.4, label="served (cskd serve + hey)")
    for i, r in zip(x, students):
        ax.annotate(f"{100 * r['served_of_engine']:.0f}%", (i + 0.2, r["served_speedup"]), ha="center", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(x), labels, fontsize=8)
    top = max(max(r["engine_speedup"], r["served_speedup"]) for r in students)
    ax.set(ylabel="speedup over the teacher (x)", title="does the engine's win survive serving? (% kept)", ylim=(0, 1.3 * top))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_plan(result: Dict[str, Any], path: Path) -> Path:
    """``plan.png``: each candidate's batch-1 latency against its FLOPs (within budget filled, the
    pick ringed), the teacher's point (or its latency as a line when its FLOPs are unknown) and the
    budget's latency as a line (the rows of a ``cskd plan`` result)."""
    plt = pyplot()
    served = result["target"]["served"]
    latency = lambda figures: figures["served_p50_ms"] if served else figures["p50_ms"]["1"]  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 5))
    for c in result["candidates"]:
        ax.scatter(c["flops"] / 1e9, latency(c), s=50, color="tab:green" if c["within_budget"] else "tab:gray",
                   edgecolors="black" if c["label"] == result["pick"] else "none", linewidths=1.5)
        ax.annotate(c["label"], (c["flops"] / 1e9, latency(c)), fontsize=7, xytext=(4, 3), textcoords="offset points")
    teacher = result["teacher"]
    if teacher["flops"]:
        ax.scatter(teacher["flops"] / 1e9, latency(teacher), s=70, marker="s", color="tab:red", label=teacher["label"])
    else:
        ax.axhline(latency(teacher), color="tab:red", linestyle=":", label=f"{teacher['label']} (FLOPs unknown)")
    if result["budget"]["latency_ms"]:
        ax.axhline(result["budget"]["latency_ms"], color="tab:blue", linestyle="--",
                   label=f"budget {result['budget']['latency_ms']:.3g} ms")
    target = result["target"]
    ylabel = "served p50 at concurrency 1 (ms)" if served else "p50 latency at batch 1 (ms)"
    ax.set(xscale="log", yscale="log", xlabel="GFLOPs per image (fused model)", ylabel=ylabel,
           title=f"candidates on {target['backend']} {target['precision']} (green: within budget)")
    for axis in (ax.xaxis, ax.yaxis):
        _plain_log_ticks(axis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _plain_log_ticks(axis) -> None:
    """Label a log axis 0.2, 0.5, 1, 2, 5... instead of matplotlib's crowded 2x10^-2 minor labels."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def plot_shifts(suite: Dict[str, Any], path: Path) -> Path:
    """``shifts.png``: per student, student minus teacher top-1 (points) for each shift x severity
    (a ``cskd bench`` shift suite); red where the student falls behind its teacher."""
    plt = pyplot()
    teacher = suite["teacher"]
    students = [label for label in suite["clean"] if label != teacher]
    shifts = list(dict.fromkeys(c["shift"] for c in suite["cells"]))
    severities = suite["severities"]
    panel = (1.1 * len(severities) + 2.6, 0.32 * len(shifts) + 1.6)
    fig, axes = plt.subplots(1, len(students), figsize=(len(students) * panel[0], panel[1]), squeeze=False)
    for ax, label in zip(axes[0], students):
        gap = np.full((len(shifts), len(severities)), np.nan)
        for c in suite["cells"]:
            gap[shifts.index(c["shift"]), severities.index(c["severity"])] = c["top1"][label] - c["top1"][teacher]
        limit = max(1.0, float(np.nanmax(np.abs(gap))))
        image = ax.imshow(gap, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for (i, j), value in np.ndenumerate(gap):
            ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(severities)), [str(s) for s in severities])
        ax.set_yticks(range(len(shifts)), shifts, fontsize=8)
        ax.set(xlabel="severity", title=f"{label.split(' (')[0]}\nminus teacher, top-1 points")
        fig.colorbar(image, ax=ax, shrink=0.6)
    fig.tight_layout()
    save_figure(fig, path)
    return path
