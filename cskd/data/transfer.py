"""The unlabelled transfer set (``data.unlabeled``): images only the teacher supervises.

A student distilled from a good teacher learns from any in-domain image the teacher has seen an
answer for, labelled or not. ``data.unlabeled`` adds such images to training:

* an IDX images file (``train-images-idx3-ubyte[.gz]``) or a folder holding one: only the images
  file is read, never a labels file;
* a folder of image files (any depth, no class folders needed).

How batches mix the two: every step takes ``train.batch_size`` labelled images, as without a
transfer set, followed by ``data.unlabeled_ratio`` times as many transfer images
(:class:`MixedBatchSampler`). The class token learns from the labelled rows only; the distillation
token and the patch tokens learn from the teacher on every row. An epoch is still one pass over the
labelled images, so switching a transfer set on changes neither what the class token sees per step
nor the LR schedule's length; it adds ``ratio x batch`` images of teacher supervision to each step
(a step costs ``1 + ratio`` times as much: for equal training time divide the epochs by it). The
transfer images come as an endless stream of passes, each in a fresh seeded order
(:class:`TransferStream`), so a short run still draws them evenly and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Sampler

from cskd.data.datasets import ArrayImageDataset, pil_mode
from cskd.data.idx import read_idx
from cskd.errors import CSKDError

UNLABELED = -1  # the label a transfer image carries through collation
IDX_IMAGES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnlabeledArrayImages(ArrayImageDataset):
    """Grayscale images ``[N, H, W]`` without labels (each yields :data:`UNLABELED`)."""

    def __init__(self, images: np.ndarray, transform: Optional[Callable] = None, mode: str = "L") -> None:
        super().__init__(images, np.full(len(images), UNLABELED), transform)
        self.mode = mode

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert(self.mode)
        return (self.transform(image) if self.transform else image), UNLABELED


class UnlabeledImageFiles(Dataset):
    """Every image file under ``root`` (sorted), without labels. ``root`` and ``samples`` are what
    :func:`~cskd.data.datasets.fingerprint` reads of an ImageFolder, so both fingerprint alike."""

    def __init__(self, root: Path, transform: Optional[Callable] = None, mode: str = "L") -> None:
        self.root, self.transform, self.mode = str(root), transform, mode
        files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.samples = [(str(p), UNLABELED) for p in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        with Image.open(self.samples[index][0]) as image:
            image = image.convert(self.mode)
        return (self.transform(image) if self.transform else image), UNLABELED


def _idx_images_file(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if "idx3" in path.name else None
    for stem in IDX_IMAGES:
        for candidate in (path / f"{stem}.gz", path / stem):
            if candidate.is_file():
                return candidate
    return None


def build_transfer_set(spec: str, channels: int, transform: Optional[Callable] = None,
                       labelled: Optional[Dataset] = None) -> Dataset:
    """The transfer set ``spec`` names (see the module), as images in the labelled data's mode.

    Images of an IDX transfer set equal to a labelled array image are left out, so pointing
    ``data.unlabeled`` at the full training split of a data set whose labelled images are a subset
    of it (the demo's) adds only the others.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise CSKDError(f"data.unlabeled={spec} does not exist; point it at a folder of images or an IDX images file")
    mode = pil_mode(channels)
    idx_file = _idx_images_file(path)
    if idx_file is not None:
        images = read_idx(idx_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise CSKDError(f"{idx_file} holds {images.dtype} {list(images.shape)}, not uint8 images [N, H, W]; "
                            "point data.unlabeled at an IDX images file")
        if isinstance(labelled, ArrayImageDataset):
            labelled_already = _already_labelled(images, labelled.images)
            if labelled_already.all():
                raise CSKDError(f"all {len(images)} images of data.unlabeled={spec} are in the labelled training split "
                                "(data.max_train picks labelled images from the split, the rest of it stays labelled "
                                "data); point data.unlabeled at other images")
            images = images[~labelled_already]
        dataset: Dataset = UnlabeledArrayImages(images, transform, mode)
    elif path.is_dir():
        dataset = UnlabeledImageFiles(path, transform, mode)
    else:
        raise CSKDError(f"data.unlabeled={spec} is neither an IDX images file nor a folder; point it at a folder of images "
                        f"({', '.join(IMAGE_SUFFIXES)}) or at an IDX images file")
    if len(dataset) == 0:
        raise CSKDError(f"data.unlabeled={spec} holds no images (looked for an IDX images file and for "
                        f"{', '.join(IMAGE_SUFFIXES)} files under it); point it at a folder that has some")
    return dataset


def _already_labelled(images: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """``[N]`` bool: which of ``images`` equal, pixel for pixel, one of the ``labelled`` images."""
    if images.shape[1:] != labelled.shape[1:]:
        return np.zeros(len(images), dtype=bool)
    digest = lambda image: hashlib.blake2b(image.tobytes(), digest_size=16).digest()  # noqa: E731
    seen = {digest(image) for image in labelled}
    return np.fromiter((digest(image) in seen for image in images), dtype=bool, count=len(images))


class TransferStream:
    """One rank's share of an endless stream over ``size`` transfer images: pass ``k`` is a random order
    seeded by ``(seed, k)``; epoch ``e`` takes the stream's ``e``-th slice of ``per_epoch`` positions
    (all ranks together, rank ``r`` every ``world_size``-th from the ``r``-th). Every image comes once
    per pass, and the images of an epoch depend only on the seed and the epoch."""

    def __init__(self, size: int, per_epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.size, self.per_epoch, self.rank, self.world_size, self.seed = size, per_epoch, rank, world_size, seed
        self.epoch = 0
        self._orders: Dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, k: int) -> torch.Tensor:
        if k not in self._orders:
            self._orders = {k: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + k))}
        return self._orders[k]

    def indices(self) -> List[int]:
        start = self.epoch * self.per_epoch
        positions = range(start + self.rank, start + self.per_epoch, self.world_size)
        return [int(self._order(p // self.size)[p % self.size]) for p in positions]


class MixedBatchSampler(Sampler[List[int]]):
    """Batches of ``labelled_batch`` labelled images then ``transfer_batch`` transfer images, as
    indices into ``ConcatDataset([labelled set, transfer set])``; as many batches as the labelled
    sampler fills (the last partial one dropped). Labelled rows come first: the loss takes the
    first ``len(labels)`` rows as the labelled ones."""

    def __init__(self, labelled: Sampler, labelled_batch: int, transfer_size: int, transfer_batch: int,
                 labelled_count: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.labelled, self.labelled_batch, self.transfer_batch = labelled, labelled_batch, transfer_batch
        self.offset = labelled_count  # where the transfer set starts in the concatenation
        self.stream = TransferStream(transfer_size, len(self) * transfer_batch * world_size, rank, world_size, seed)

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labelled) // self.labelled_batch

    def __iter__(self) -> Iterator[List[int]]:
        labelled = list(self.labelled)
        transfer = self.stream.indices()
        for step in range(len(self)):
            rows = labelled[step * self.labelled_batch : (step + 1) * self.labelled_batch]
            extra = transfer[step * self.transfer_batch : (step + 1) * self.transfer_batch]
            yield rows + [self.offset + i for i in extra]


def training_images(split: Dataset, unlabeled: Optional[str], channels: int, transform: Optional[Callable] = None) -> Dataset:
    """What a run trains on and a teacher cache covers: the training split, followed by the transfer
    set when ``unlabeled`` names one (cache rows ``len(split)`` onwards)."""
    if not unlabeled:
        return split
    return ConcatDataset([split, build_transfer_set(unlabeled, channels, transform, split)])
