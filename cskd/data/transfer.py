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

What it leaves out: every image equal to a labelled training image or a validation image, whatever
the transfer set's format (:func:`leave_out_known`). A student trained on its validation images
would report a contaminated accuracy, and a labelled image is already taught by its label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Sampler

from cskd.data.datasets import ArrayImageDataset, pil_mode, read_image
from cskd.data.idx import read_idx
from cskd.errors import CSKDError

UNLABELED = -1  # the label a transfer image carries through collation
IDX_IMAGES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class LeftOut:
    """How many images of a transfer set were left out, and as equal to what."""

    spec: str  # data.unlabeled
    labelled: int = 0  # equal to a labelled training image
    validation: int = 0  # equal to a validation image (and to no labelled one)

    @property
    def count(self) -> int:
        return self.labelled + self.validation

    def line(self) -> str:
        """One line for the run's output; empty when nothing was left out."""
        if not self.count:
            return ""
        return (f"left out {self.labelled} images of data.unlabeled={self.spec} equal to labelled training images and "
                f"{self.validation} equal to validation images: a transfer image must be neither (the validation "
                "accuracy would count images the student trained on)")


class UnlabeledArrayImages(ArrayImageDataset):
    """Grayscale images ``[N, H, W]`` without labels (each yields :data:`UNLABELED`)."""

    def __init__(self, images: np.ndarray, transform: Optional[Callable] = None, mode: str = "L") -> None:
        super().__init__(images, np.full(len(images), UNLABELED), transform)
        self.mode = mode
        self.left_out: Optional[LeftOut] = None  # set by build_transfer_set

    def subset(self, keep: np.ndarray) -> "UnlabeledArrayImages":
        return UnlabeledArrayImages(self.images[keep], self.transform, self.mode)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert(self.mode)
        return (self.transform(image) if self.transform else image), UNLABELED


class UnlabeledImageFiles(Dataset):
    """Image files under ``root`` (by default every one, sorted), without labels. ``root`` and ``samples``
    are what :func:`~cskd.data.datasets.fingerprint` reads of an ImageFolder, so both fingerprint alike."""

    def __init__(self, root: Path, transform: Optional[Callable] = None, mode: str = "L",
                 files: Optional[Sequence[str]] = None) -> None:
        self.root, self.transform, self.mode = str(root), transform, mode
        if files is None:
            files = [str(p) for p in sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())]
        self.samples = [(path, UNLABELED) for path in files]
        self.left_out: Optional[LeftOut] = None  # set by build_transfer_set

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image = read_image(self.samples[index][0], self.mode)
        return (self.transform(image) if self.transform else image), UNLABELED

    def subset(self, keep: np.ndarray) -> "UnlabeledImageFiles":
        return UnlabeledImageFiles(Path(self.root), self.transform, self.mode,
                                   [path for (path, _), kept in zip(self.samples, keep) if kept])


Unlabeled = Union[UnlabeledArrayImages, UnlabeledImageFiles]


def _idx_images_file(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if "idx3" in path.name else None
    for stem in IDX_IMAGES:
        for candidate in (path / f"{stem}.gz", path / stem):
            if candidate.is_file():
                return candidate
    return None


def build_transfer_set(spec: str, channels: int, transform: Optional[Callable] = None,
                       labelled: Optional[Dataset] = None, validation: Optional[Dataset] = None) -> Dataset:
    """The transfer set ``spec`` names (see the module), as images in the labelled data's mode, less
    every image equal to one of ``labelled`` (the whole training split) or ``validation`` (the whole
    validation split): its ``left_out`` says how many. Pointing ``data.unlabeled`` at the full
    training split of a data set whose labelled images are a subset of it (the demo's), or at an image
    folder's own root, adds only the other images.
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
        dataset: Unlabeled = UnlabeledArrayImages(images, transform, mode)
    elif path.is_dir():
        dataset = UnlabeledImageFiles(path, transform, mode)
    else:
        raise CSKDError(f"data.unlabeled={spec} is neither an IDX images file nor a folder; point it at a folder of images "
                        f"({', '.join(IMAGE_SUFFIXES)}) or at an IDX images file")
    if len(dataset) == 0:
        raise CSKDError(f"data.unlabeled={spec} holds no images (looked for an IDX images file and for "
                        f"{', '.join(IMAGE_SUFFIXES)} files under it); point it at a folder that has some")
    return leave_out_known(dataset, spec, mode, labelled, validation)


def leave_out_known(transfer: Unlabeled, spec: str, mode: str, labelled: Optional[Dataset],
                    validation: Optional[Dataset]) -> Unlabeled:
    """``transfer`` less the images equal to a ``labelled`` or ``validation`` image, with ``left_out``
    saying how many."""
    references = [d for d in (labelled, validation) if d is not None]
    if not references:
        transfer.left_out = LeftOut(spec)
        return transfer
    masks = _equal_images(_pixels(transfer, mode), [_pixels(d, mode) for d in references])
    in_labelled = masks[0] if labelled is not None else np.zeros(len(transfer), dtype=bool)
    in_validation = masks[-1] & ~in_labelled if validation is not None else np.zeros(len(transfer), dtype=bool)
    left_out = LeftOut(spec, int(in_labelled.sum()), int(in_validation.sum()))
    if left_out.count == len(transfer):
        raise CSKDError(f"all {len(transfer)} images of data.unlabeled={spec} are labelled training or validation images "
                        f"({left_out.labelled} labelled, {left_out.validation} validation; data.max_train picks labelled "
                        "images from the split, the rest of it stays labelled data); point data.unlabeled at other images")
    kept = transfer.subset(~(in_labelled | in_validation)) if left_out.count else transfer
    kept.left_out = left_out
    return kept


# Equality of images as a run decodes them: the pixels in the run's PIL mode (a PNG and a BMP of the
# same pixels are equal, a JPEG re-encoding is not), compared by a hash of shape and bytes. Sizes come
# first from the file headers (cheap), so only images of a size the other side has are decoded.
Size = Tuple[int, int]  # (width, height)


@dataclass
class _Pixels:
    sizes: List[Size]
    digest: Callable[[int], bytes]  # of image i's decoded pixels


def _digest(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


def _pixels(dataset: Dataset, mode: str) -> _Pixels:
    """What equality needs of an array data set (ours) or a data set of files (ImageFolder, ours)."""
    if isinstance(dataset, ArrayImageDataset):  # grayscale arrays, converted as __getitem__ would
        images = dataset.images
        in_mode = (lambda i: images[i]) if mode == "L" else (lambda i: np.asarray(Image.fromarray(images[i], "L").convert(mode)))
        return _Pixels([(images.shape[2], images.shape[1])] * len(images), lambda i: _digest(in_mode(i)))
    paths = [path for path, _ in getattr(dataset, "samples", None) or ()]
    if not paths and len(dataset):
        raise TypeError(f"cannot compare the images of a {type(dataset).__name__}: neither arrays nor files")
    return _Pixels([_header_size(p) for p in paths], lambda i: _digest(np.asarray(read_image(paths[i], mode))))


def _header_size(path: str) -> Size:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as exc:  # PIL's UnidentifiedImageError among them
        raise CSKDError(f"cannot read image {path} ({exc}); remove or replace the file") from None


def _equal_images(candidates: _Pixels, references: Sequence[_Pixels]) -> List[np.ndarray]:
    """One ``[N]`` bool per reference: which of ``candidates`` equal one of its images. Each image is
    decoded at most once, and only when the other side has an image of its size."""
    wanted = set(candidates.sizes)
    seen: List[Set[bytes]] = [{r.digest(i) for i, size in enumerate(r.sizes) if size in wanted} for r in references]
    sizes = [set(r.sizes) for r in references]
    masks = [np.zeros(len(candidates.sizes), dtype=bool) for _ in references]
    for i, size in enumerate(candidates.sizes):
        if any(size in s for s in sizes):
            digest = candidates.digest(i)
            for mask, digests in zip(masks, seen):
                mask[i] = digest in digests
    return masks


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


def training_images(split: Dataset, unlabeled: Optional[str], channels: int, transform: Optional[Callable] = None,
                    validation: Optional[Dataset] = None) -> Dataset:
    """What a run trains on and a teacher cache covers: the training split, followed by the transfer
    set when ``unlabeled`` names one (cache rows ``len(split)`` onwards), less the images equal to one
    of ``split`` or ``validation``. Training and caching pass the same whole splits, so both leave out
    the same images and the cache's rows are the run's."""
    if not unlabeled:
        return split
    return ConcatDataset([split, build_transfer_set(unlabeled, channels, transform, split, validation)])


def left_out_line(images: Dataset) -> str:
    """What :func:`training_images` left out of its transfer set, as a line for the run's output ('' if nothing)."""
    left_out = getattr(images.datasets[1], "left_out", None) if isinstance(images, ConcatDataset) else None
    return left_out.line() if left_out is not None else ""
