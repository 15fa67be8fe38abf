"""Choosing images from a data set: fixed subsets, index-carrying samples, real-image arrays."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cskd.errors import CSKDError


def limit(dataset: Dataset, count: Optional[int]) -> Dataset:
    """A fixed random subset of ``count`` images (the same for every seed and process), or the whole set."""
    if count is None or count >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count].sort().values
    return torch.utils.data.Subset(dataset, keep.tolist())


class Indexed(Dataset):
    """``(image, label, batch)`` where ``batch`` holds the sample's index in ``dataset`` and whatever
    geometry its transform recorded (crop box, flip): what cached teacher targets are looked up by.
    ``offset`` is where ``dataset`` starts among the images a cache holds (a transfer set follows
    the training split)."""

    def __init__(self, dataset: Dataset, offset: int = 0) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        meta = {"index": self.offset + index}
        if isinstance(image, tuple):  # (tensor, geometry) from a geometry-recording transform
            image, geometry = image
            meta.update(geometry)
        return image, label, meta


def sample_order(size: int) -> np.ndarray:
    """One fixed random order of ``range(size)`` (seed 0: the same on every call and machine). Samples
    are consecutive slices of it: spread over every class, not the first folder, and disjoint when
    their slices are."""
    return np.random.default_rng(0).permutation(size)


def sample_images(dataset: Dataset, count: int, skip: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``skip`` to ``skip + count`` of :func:`sample_order` (fewer where ``dataset`` ends) as
    uint8 ``[N, C, H, W]`` with their labels; the dataset's transform must give [0, 1] tensors. A
    sample that skips the images of another shares none with it."""
    if count < 1 or skip < 0:  # a negative bound would slice from the order's end
        raise CSKDError(f"cannot sample {count} images after the first {skip}: ask for 1 or more and skip 0 or more")
    picks = sample_order(len(dataset))[skip : skip + count].tolist()
    if not picks:
        taken = f" and the first {skip} are another sample's" if skip else ""
        raise CSKDError(f"no images to sample: the data set has {len(dataset)}{taken}; use a larger data set"
                        + (" or a smaller other sample" if skip else ""))
    images = np.stack([(dataset[i][0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for i in picks])
    labels = np.array([dataset[i][1] for i in picks])
    return images, labels
