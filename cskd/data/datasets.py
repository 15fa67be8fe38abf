"""The data sets cskd trains on: the embedded Fashion-MNIST demo, full Fashion-MNIST, ImageFolder.

Every data set yields ``(PIL image, label)`` through a transform and carries a
:class:`DatasetInfo` (classes, channels and the normalisation statistics to use by default).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from cskd.assets import demo_arrays
from cskd.data.idx import read_idx_split
from cskd.errors import CSKDError, did_you_mean

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
DATASETS = {
    "fashion-mnist-demo": "the Fashion-MNIST subset embedded in cskd (10,000 train / 2,000 val images)",
    "fashion-mnist": "Fashion-MNIST IDX files (data.path, default the Debian package's folder)",
    "imagefolder": "data.path/train/<class>/*.jpg and data.path/val/<class>/*.jpg",
}


@dataclass(frozen=True)
class DatasetInfo:
    class_names: List[str]
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ArrayImageDataset(Dataset):
    """Grayscale images held as a uint8 array ``[N, H, W]`` with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None) -> None:
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L")
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def fashion_mnist_arrays(path: Optional[str], split: str) -> Tuple[np.ndarray, np.ndarray]:
    return read_idx_split(path or FASHION_MNIST_DEBIAN_PATH, "train" if split == "train" else "t10k")


def pil_mode(channels: int) -> str:
    """The PIL mode images are read in for a data set of ``channels`` channels."""
    return "L" if channels == 1 else "RGB"


def read_image(path: str, mode: str) -> Image.Image:
    """The image file ``path`` decoded in PIL ``mode``: how every data set of image files reads one."""
    with Image.open(path) as image:
        return image.convert(mode)


def _image_folder(root: Path, split: str, channels: int, transform: Optional[Callable]) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise CSKDError(f"{folder} does not exist; an imagefolder root needs train/<class>/*.jpg and val/<class>/*.jpg")
    try:
        return ImageFolder(str(folder), transform=transform, loader=partial(read_image, mode=pil_mode(channels)))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CSKDError(f"{folder}: {exc}; put images in one sub-folder per class") from None


def build_dataset(
    name: str, split: str, path: Optional[str] = None, channels: Optional[int] = None, transform: Optional[Callable] = None
) -> Tuple[Dataset, DatasetInfo]:
    """The ``split`` ("train" or "val") of data set ``name`` and its :class:`DatasetInfo`."""
    if name in ("fashion-mnist-demo", "fashion-mnist"):
        images, labels = demo_arrays(split) if name == "fashion-mnist-demo" else fashion_mnist_arrays(path, split)
        info = DatasetInfo(FASHION_MNIST_CLASSES, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        return ArrayImageDataset(images, labels, transform), info
    if name == "imagefolder":
        if not path:
            raise CSKDError("data.name=imagefolder needs data.path=ROOT (a folder with train/ and val/)")
        channels = channels or 3
        dataset = _image_folder(Path(path), split, channels, transform)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        return dataset, DatasetInfo(list(dataset.classes), channels, mean, std)
    raise CSKDError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}; use one of {', '.join(DATASETS)}")


def fingerprint(dataset: Dataset) -> str:
    """A hash that changes when the images, their labels or their order change.

    Array data sets hash their pixels; ImageFolder trees hash each file's relative path, size,
    modification time (ns) and label (reading every image of a large tree would take longer than the
    teacher pass it guards; the time catches an image rewritten at the same size). A copy of the
    tree keeps its fingerprint only when it keeps the times (``cp -p``, ``rsync -a``).
    """
    digest = hashlib.sha256()
    if isinstance(dataset, ConcatDataset):  # a training split and its transfer set: one fingerprint of both
        for part in dataset.datasets:
            digest.update(fingerprint(part).encode())
    elif isinstance(dataset, ArrayImageDataset):
        digest.update(np.ascontiguousarray(dataset.images).tobytes())
        digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    elif hasattr(dataset, "samples") and hasattr(dataset, "root"):  # torchvision ImageFolder
        root = Path(dataset.root)
        for path, label in dataset.samples:
            stat = Path(path).stat()
            digest.update(f"{Path(path).relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}\n".encode())
    else:
        raise CSKDError(f"cannot fingerprint a {type(dataset).__name__}; use one of {', '.join(DATASETS)}")
    return digest.hexdigest()
