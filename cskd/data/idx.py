"""Read IDX files (the MNIST / Fashion-MNIST format), gzipped or raw."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Tuple

import numpy as np

from cskd.errors import CSKDError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise CSKDError(f"cannot read IDX file {path} ({exc}); re-download or reinstall the data set") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise CSKDError(f"{path} is not an IDX file (bad magic number); point data.path at the Fashion-MNIST IDX files")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise CSKDError(f"{path} is truncated: header says {shape}, found {array.size} values; re-download it")
    return array.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    if (folder / "train").is_dir():  # an image folder given to a Fashion-MNIST config (e.g. --config teacher-demo)
        raise CSKDError(f"{folder} is an image folder (it has train/), not the Fashion-MNIST IDX files this config reads; "
                        "add data.name=imagefolder")
    raise CSKDError(
        f"no {stem}[.gz] in {folder}; set data.path to a folder holding the Fashion-MNIST IDX files "
        "(Debian: apt-get install dataset-fashion-mnist)"
    )


def read_idx_split(folder: str | Path, prefix: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images [N,28,28] uint8, labels [N] int64)`` for ``prefix`` "train" or "t10k"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CSKDError(
            f"data folder {folder} does not exist; set data.path to the Fashion-MNIST IDX folder "
            "(Debian: apt-get install dataset-fashion-mnist)"
        )
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise CSKDError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels; the files do not belong together")
    return images, labels
