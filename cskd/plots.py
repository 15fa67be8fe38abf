"""PNG plots of a training run (``curves.png``), and the plotting helpers every cskd plot uses
(:mod:`cskd.measure.plots` draws what measurement measures).

matplotlib is imported on first use (it is heavy and only plots need it), with its file-only backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from cskd.files import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    pyplot().close(fig)


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> None:
    """Loss parts, learning rate with the CKF ratio, and validation top-1 per head against epochs."""
    plt = pyplot()
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
    save_figure(fig, path)
