"""Make the embedded Fashion-MNIST demo subset shipped in cskd/assets/.

A stratified, seeded sample: TRAIN_PER_CLASS images per class from the official training split and
VAL_PER_CLASS per class from the official test split, stored as uint8 arrays in one compressed
.npz (about 5 MB). Rerunning with the same IDX files gives the same file.

    python scripts/make_demo_data.py ../shared/data/fashion-mnist   # or /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from cskd.data.idx import read_idx_split

TRAIN_PER_CLASS, VAL_PER_CLASS, SEED = 1000, 200, 20231001
OUT = Path(__file__).resolve().parents[1] / "cskd" / "assets"


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("idx_dir", type=Path, help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, source, per_class in (("train", "train", TRAIN_PER_CLASS), ("val", "t10k", VAL_PER_CLASS)):
        images, labels = read_idx_split(args.idx_dir, source)
        keep = stratified(labels, per_class, rng)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "fashion_mnist_demo.npz", **arrays)
    shutil.copy(args.idx_dir / "LICENSE", OUT / "FASHION_MNIST_LICENSE")
    sizes = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {OUT / 'fashion_mnist_demo.npz'}: {sizes}")


if __name__ == "__main__":
    main()
