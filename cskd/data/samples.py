"""Choosing images from a data set: fixed subsets, index-carrying samples, real-image arrays."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset


def limit(dataset: Dataset, count: Optional[int]) -> Dataset:
    """A fixed random subset of ``count`` images (the same for every seed and process), or the whole set."""
    if count is None or count >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count].sort().values
    return torch.utils.data.Subset(dataset, keep.tolist())


class Indexed(Dataset):
    """``(image, label, batch)`` where ``batch`` holds the sample's index in ``dataset`` and whatever
    geometry its transform recorded (crop box, flip): what cached teacher targets are looked up by."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        meta = {"index": index}
        if isinstance(image, tuple):  # (tensor, geometry) from a geometry-recording transform
            image, geometry = image
            meta.update(geometry)
        return image, label, meta


def sample_images(dataset: Dataset, count: int, offset: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` images spread over ``dataset`` (every class, not the first folder) as uint8
    ``[N, C, H, W]`` with their labels; the dataset's transform must give [0, 1] tensors. Samples
    with different ``offset`` (below ``len / count``) share no image."""
    step = max(1, len(dataset) // count)
    picks = list(range(offset % step, len(dataset), step))[:count]
    images = np.stack([(dataset[i][0].numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for i in picks])
    labels = np.array([dataset[i][1] for i in picks])
    return images, labels
