"""Offline teacher targets: the teacher's dense logit map of every training image, computed once.

```
CACHE/manifest.json        what the maps are of: teacher (checkpoint hash, options, normalisation),
                           data set (fingerprint), image size and interpolation, teacher grid,
                           classes, top-k, shard layout, completeness; and the teacher's top-1/top-5
                           on the validation split (teacher_val_*), which student runs report
CACHE/shard-00000.npy      float16 [n, K or k, H, W]: the logits (all classes, or the k largest per cell)
CACHE/shard-00000.idx.npy  int16 [n, k, H, W]: their class indices (top-k caches only; int32 above
                           32,768 classes)
```

Each map is the teacher's view of the WHOLE image resized to ``image_size`` x ``image_size``
(aspect ratio not kept, nothing cropped), the coordinates training crop boxes are recorded in.
Shards are written atomically and independently, so a killed run resumes where it stopped, and
under torchrun each rank writes its own shards. Shards are memory-mapped when read. Training
refuses a cache made of anything that changes the targets: another teacher, teacher options or
normalisation, other data, image size, interpolation or classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cskd import __version__
from cskd.data.validation import TeacherAccuracy
from cskd.errors import CSKDError
from cskd.files import atomic_write, atomic_write_json
from cskd.progress import progress

# 2: maps of the whole image squashed to a square (1: of its centre crop, misaligned with the crop
# boxes on non-square images); ImageFolder fingerprints include modification times.
CACHE_FORMAT = "cskd-teacher-cache-2"
MANIFEST = "manifest.json"
ALL_CLASSES_UP_TO = 64  # store every class when there are at most this many, else the top-k per cell
DEFAULT_TOPK = 10
MISSING_LOGIT_GAP = 10.0  # classes outside the stored top-k sit this far below the k-th logit (softmax ~e^-10)


@dataclass
class CacheManifest:
    teacher: Dict[str, Any]  # model, checkpoint, sha256, kwargs, mean, std
    data: Dict[str, Any]  # name, split, count, fingerprint
    image_size: int  # the teacher saw each whole image resized (squashed) to this size
    grid: Tuple[int, int]  # the teacher's feature map (H, W)
    num_classes: int
    topk: Optional[int]  # None: every class stored
    shard_size: int
    interpolation: str = "bicubic"  # how each image was resized to image_size (data.interpolation)
    complete: bool = False
    dtype: str = "float16"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    toolkit: str = __version__
    format: str = CACHE_FORMAT
    # The teacher on the validation images a student run validates on (TeacherAccuracy.record); None in
    # caches made before it was recorded, and then a run measures it itself.
    teacher_val_top1: Optional[float] = None
    teacher_val_top5: Optional[float] = None
    teacher_val_split: Optional[Dict[str, Any]] = None

    @property
    def count(self) -> int:
        return int(self.data["count"])

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def identity(self) -> Dict[str, Any]:
        """What must match for two caches (or a cache and a run) to describe the same maps: everything
        that changes a target. Values as JSON stores them (lists, not tuples), so they compare equal."""
        return _as_json({"teacher_sha256": self.teacher["sha256"], "teacher_model": self.teacher["model"],
                         "teacher_kwargs": self.teacher.get("kwargs"), "teacher_mean": self.teacher.get("mean"),
                         "teacher_std": self.teacher.get("std"), "data_fingerprint": self.data["fingerprint"],
                         "image_size": self.image_size, "interpolation": self.interpolation,
                         "num_classes": self.num_classes, "topk": self.topk})

    def accuracy(self) -> Optional[TeacherAccuracy]:
        """The teacher's validation accuracy this cache recorded, if it did."""
        return TeacherAccuracy.of_record(asdict(self), "cache")

    @classmethod
    def read(cls, folder: Path) -> "CacheManifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise CSKDError(f"{folder} is not a teacher cache (no {MANIFEST}); make one with `cskd cache-teacher`")
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT:
            raise CSKDError(f"{path} has format {data.get('format')!r}, not {CACHE_FORMAT!r}; rebuild it with `cskd cache-teacher`")
        data["grid"] = tuple(data["grid"])
        return cls(**data)

    def write(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, asdict(self))


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def mismatches(have: Dict[str, Any], need: Dict[str, Any]) -> List[str]:
    """``"key is A, the run needs B"`` for each key of ``need`` that ``have`` holds differently (or not at all)."""
    have, need = _as_json(have), _as_json(need)
    return [f"{key} is {have.get(key)!r}, the run needs {value!r}" for key, value in need.items()
            if key not in have or have[key] != value]


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds every class index ``0 .. num_classes - 1`` (int16 keeps
    top-k shards small; a 40,000-class teacher needs int32, in int16 its indices would wrap)."""
    for dtype in (np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise CSKDError(f"a top-k teacher cache indexes at most {np.iinfo(np.int32).max + 1} classes, this teacher has "
                    f"{num_classes}; train with the teacher online (drop teacher.cache)")


def storage_topk(num_classes: int, topk: Optional[int]) -> Optional[int]:
    """How many classes per cell a cache of ``num_classes`` stores (None: all), refusing what cannot be
    stored; checked before the teacher runs, not after a pass over the data."""
    if topk is None and num_classes > ALL_CLASSES_UP_TO:
        topk = DEFAULT_TOPK
    if topk is not None and not 1 <= topk < num_classes:
        raise CSKDError(f"--topk {topk} must be between 1 and {num_classes - 1}; omit it to store every class")
    if topk is not None:
        index_dtype(num_classes)
    return topk


def shard_paths(folder: Path, shard: int) -> Tuple[Path, Path]:
    return Path(folder) / f"shard-{shard:05d}.npy", Path(folder) / f"shard-{shard:05d}.idx.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
            np.save(f, array)

    atomic_write(path, write)


def compress(maps: torch.Tensor, topk: Optional[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Dense logits ``[n, K, H, W]`` -> float16 values (and, for a top-k cache, class indices in
    :func:`index_dtype` of K; :func:`expand` reads back whichever integer type is stored)."""
    if topk is None:
        return maps.to(torch.float16).cpu().numpy(), None
    values, indices = maps.topk(topk, dim=1)
    return values.to(torch.float16).cpu().numpy(), indices.cpu().numpy().astype(index_dtype(maps.shape[1]))


def expand(values: torch.Tensor, indices: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Stored rows -> float32 logits ``[n, K, H, W]``; classes outside a top-k get the k-th value
    minus :data:`MISSING_LOGIT_GAP` (finite, so means and KL stay finite; far below every kept class)."""
    values = values.float()
    if indices is None:
        return values
    floor = values.min(dim=1, keepdim=True).values - MISSING_LOGIT_GAP
    full = floor.expand(-1, num_classes, -1, -1).clone()
    return full.scatter_(1, indices.long(), values)


class TeacherCache:
    """A complete cache, memory-mapped: ``maps(indices)`` gives the float32 logit maps of those images."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = CacheManifest.read(self.folder)
        if not self.manifest.complete:
            raise CSKDError(f"teacher cache {self.folder} is incomplete (an interrupted `cskd cache-teacher`); "
                            "run the same command again to finish it")
        self._values: List[np.ndarray] = []
        self._indices: List[Optional[np.ndarray]] = []
        for shard in range(self.manifest.shards):
            values_path, index_path = shard_paths(self.folder, shard)
            self._values.append(np.load(values_path, mmap_mode="r"))
            self._indices.append(np.load(index_path, mmap_mode="r") if self.manifest.topk else None)

    def check_matches(self, expected: Dict[str, Any], rebuild: str = "`cskd cache-teacher` (same config)") -> None:
        """Refuse a cache whose targets differ from the run's: another teacher, its options or
        normalisation, other data, another size, interpolation or class count (keys of :meth:`CacheManifest.identity`)."""
        wrong = mismatches(self.manifest.identity(), expected)
        if wrong:
            raise CSKDError(f"teacher cache {self.folder} does not match this run ({'; '.join(wrong)}); rebuild it with "
                            f"{rebuild} or drop teacher.cache to run the teacher online")

    def maps(self, indices: torch.Tensor) -> torch.Tensor:
        size = self.manifest.shard_size
        rows = indices.tolist()
        values = torch.from_numpy(np.stack([self._values[i // size][i % size] for i in rows]))
        index_rows = None
        if self.manifest.topk:
            index_rows = torch.from_numpy(np.stack([self._indices[i // size][i % size] for i in rows]))
        return expand(values, index_rows, self.manifest.num_classes)


def write_cache(folder: Path, manifest: CacheManifest, dataset, teacher_fn, rank: int = 0, world_size: int = 1,
                batch_size: int = 256, workers: int = 2, show_progress: bool = True) -> int:
    """Compute and store this rank's missing shards; returns how many images it computed.

    ``teacher_fn(images [N,C,H,W] in [0,1]) -> dense logits [N,K,H,W]``. Shards already on disk are
    skipped, so an interrupted run continues where it stopped.
    """
    mine = [s for s in range(manifest.shards) if s % world_size == rank and not shard_paths(folder, s)[0].is_file()]
    todo = sum(min(manifest.shard_size, manifest.count - s * manifest.shard_size) for s in mine)
    with progress(todo, "teacher cache", "img", show_progress, leave=True) as bar:
        for shard in mine:
            start = shard * manifest.shard_size
            rows = Subset(dataset, range(start, min(start + manifest.shard_size, manifest.count)))
            chunks = []
            for images, _ in DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers):
                chunks.append(teacher_fn(images).float().cpu())
                bar.update(len(images))
            values, indices = compress(torch.cat(chunks), manifest.topk)
            values_path, index_path = shard_paths(folder, shard)
            if indices is not None:
                _save_npy(index_path, indices)
            _save_npy(values_path, values)  # last: a shard counts as done once its values exist
    return todo


def missing_shards(folder: Path, manifest: CacheManifest) -> List[int]:
    return [s for s in range(manifest.shards) if not shard_paths(folder, s)[0].is_file()]
