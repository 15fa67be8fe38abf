"""Files shipped inside the package: the embedded Fashion-MNIST subset and the demo teacher."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Tuple

import numpy as np

DEMO_DATA = "fashion_mnist_demo.npz"
DEMO_TEACHER = "teacher_fashion_mnist_demo.safetensors"
DEMO_TEACHER_CACHE = "teacher_cache_fashion_mnist_demo"  # the demo teacher over the embedded training split
DEMO_REFERENCE = "demo"  # teacher.checkpoint=demo and teacher.cache=demo name the two above


def asset_path(name: str) -> Path:
    return Path(str(resources.files("cskd") / "assets" / name))


def demo_arrays(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The embedded subset (made by scripts/make_demo_data.py): 10,000 train / 2,000 val images
    as uint8 ``[N, 28, 28]`` with int64 labels; ``split`` is "train" or "val"."""
    with np.load(asset_path(DEMO_DATA)) as arrays:
        return arrays[f"{split}_images"], arrays[f"{split}_labels"]
