"""PNG plots: training curves, and latency / accuracy of benchmarked packages.

matplotlib is imported on first use (it is heavy and only plots need it), with its file-only backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from cskd.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    _pyplot().close(fig)


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> None:
    """Loss parts, learning rate with the CKF ratio, and validation top-1 per head against epochs."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in sorted(k for k in rows[0] if k.startswith("loss")):
        axes[0].plot(epochs, [r[key] for r in rows], marker=".", label=key.replace("loss_", ""))
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [r["lr"] for r in rows], marker=".", color="tab:blue", label="lr")
    axes[1].set(title="learning rate and CKF ratio", xlabel="epoch", ylabel="lr")
    if any("loss_cskd" in r for r in rows):
        twin = axes[1].twinx()
        twin.plot(epochs, [r["ckf_ratio"] for r in rows], marker=".", color="tab:orange", label="CKF r")
        twin.set(ylabel="r (weight of dense teacher logits)", ylim=(-0.05, 1.05))
        twin.legend(loc="upper right")
    for key in sorted(k for k in rows[0] if k.startswith("val_top1_")):
        axes[2].plot(epochs, [r[key] for r in rows], marker=".", label=key.replace("val_top1_", ""))
    axes[2].set(title="validation top-1 (%)", xlabel="epoch")
    for ax in (axes[0], axes[1], axes[2]):
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(loc="upper left")
    axes[2].legend()
    fig.tight_layout()
    _save(fig, path)


def plot_bench(result: Dict[str, Any], folder: Path) -> List[Path]:
    """``latency.png`` (p50 against batch size) and ``accuracy_latency.png`` of a ``cskd bench`` result."""
    plt = _pyplot()
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
    _save(fig, paths[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    smallest = min(r["batch"] for r in result["rows"])
    for r in (r for r in result["rows"] if r["batch"] == smallest and r["top1"] is not None):
        ax.scatter(r["p50_ms"], r["top1"], s=60, marker="s" if r["role"] == "teacher" else "o")
        ax.annotate(r["model"], (r["p50_ms"], r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel=f"p50 latency at batch {smallest} (ms)", ylabel="top-1 (%)", title="accuracy against latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, paths[1])
    return paths


def plot_served(rows: List[Dict[str, Any]], path: Path) -> Path:
    """``served.png``: each student's speedup over the teacher as its engine measures it and as served,
    side by side per concurrency (the rows of a ``cskd bench --served`` result)."""
    plt = _pyplot()
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
    _save(fig, path)
    return path
