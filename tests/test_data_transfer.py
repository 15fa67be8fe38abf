"""The unlabelled transfer set: what it reads (and never reads), how batches mix it with the labelled
images, and how its stream of images depends only on the seed and the epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import ConcatDataset

from cskd.data.datasets import ArrayImageDataset, build_dataset, fingerprint
from cskd.data.transfer import UNLABELED, LeftOut, MixedBatchSampler, TransferStream, build_transfer_set, training_images
from cskd.errors import CSKDError
from tests.conftest import random_images, write_idx_images, write_imagefolder


def test_an_idx_folder_gives_its_images_without_labels_and_never_reads_a_labels_file(tmp_path):
    images = random_images(5)
    write_idx_images(tmp_path / "train-images-idx3-ubyte.gz", images)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not an IDX file: reading it would fail")
    transfer = build_transfer_set(str(tmp_path), channels=1)
    assert len(transfer) == 5
    image, label = transfer[3]
    assert label == UNLABELED and np.array_equal(np.asarray(image), images[3])


def test_images_already_labelled_or_validation_images_are_left_out_of_an_idx_transfer_set(tmp_path):
    """The demo's case: the labelled images are a subset of the full training split named as transfer set."""
    everything = random_images(8)
    labelled = ArrayImageDataset(everything[[1, 4, 6]], np.array([0, 1, 2]))
    validation = ArrayImageDataset(everything[[2, 4]], np.array([0, 1]))  # image 4 is both: counted as labelled
    write_idx_images(tmp_path / "images-idx3-ubyte", everything)
    transfer = build_transfer_set(str(tmp_path / "images-idx3-ubyte"), channels=1, labelled=labelled, validation=validation)
    assert np.array_equal(transfer.images, everything[[0, 3, 5, 7]])
    assert transfer.left_out == LeftOut(str(tmp_path / "images-idx3-ubyte"), labelled=3, validation=1)


def _save(pixels: np.ndarray, path, mode: str = "L") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, mode="L")
    (image.convert(mode) if mode != "L" else image).save(path)
    return path.name


def test_a_folder_transfer_set_at_the_image_folders_own_root_holds_only_its_other_images(tmp_path):
    """The issue's case: data.unlabeled at the root of the labelled image folder. Equal means equal
    pixels as the run decodes them: a BMP copy of a validation PNG and an RGB copy of a labelled gray
    image (R = G = B, so the same gray levels) are left out; a copy with one pixel changed is not."""
    write_imagefolder(tmp_path, [(32, 32), (28, 20)])  # 10 labelled images, 10 validation images
    labelled, _ = build_dataset("imagefolder", "train", str(tmp_path), channels=1)
    validation, _ = build_dataset("imagefolder", "val", str(tmp_path), channels=1)
    first_labelled = np.asarray(Image.open(labelled.samples[0][0]))
    first_validation = np.asarray(Image.open(validation.samples[3][0]))
    changed = first_validation.copy()
    changed[0, 0] ^= 1
    others = [_save(random_images(1, seed=s)[0], tmp_path / "more" / f"new{s}.png") for s in range(3)]
    _save(first_validation, tmp_path / "more" / "copy.bmp")
    _save(first_labelled, tmp_path / "more" / "copy-rgb.png", mode="RGB")
    others.append(_save(changed, tmp_path / "more" / "changed.png"))
    transfer = build_transfer_set(str(tmp_path), channels=1, labelled=labelled, validation=validation)
    assert sorted(Path(path).name for path, _ in transfer.samples) == sorted(others)
    assert transfer.left_out == LeftOut(str(tmp_path), labelled=10 + 1, validation=10 + 1)
    assert transfer.left_out.line().startswith(f"left out 11 images of data.unlabeled={tmp_path} equal to labelled "
                                               "training images and 11 equal to validation images")


def test_a_folder_transfer_set_leaves_out_the_images_of_array_data(tmp_path):
    """Labelled and validation images held as arrays (the demo, IDX data) against PNG files of them."""
    images = random_images(6, seed=4)
    labelled = ArrayImageDataset(images[:3], np.arange(3))
    validation = ArrayImageDataset(images[3:5], np.arange(2))
    names = [_save(image, tmp_path / f"{i}.png") for i, image in enumerate(images)]
    transfer = build_transfer_set(str(tmp_path), channels=1, labelled=labelled, validation=validation)
    assert [Path(path).name for path, _ in transfer.samples] == [names[5]]
    assert (transfer.left_out.labelled, transfer.left_out.validation) == (3, 2)


def test_a_folder_of_images_at_any_depth_is_a_transfer_set_in_the_labelled_datas_mode(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "deeper/b.jpg", "deeper/still/c.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), mode="RGB").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    gray = build_transfer_set(str(tmp_path), channels=1)
    assert [p.split("/")[-1] for p, _ in gray.samples] == ["a.png", "b.jpg", "c.PNG"]
    image, label = gray[0]
    assert image.mode == "L" and image.size == (30, 20) and label == UNLABELED
    assert build_transfer_set(str(tmp_path), channels=3)[2][0].mode == "RGB"


def test_a_transfer_set_of_only_labelled_images_says_so():
    images = random_images(4)
    labelled = ArrayImageDataset(images, np.arange(4))
    with pytest.raises(CSKDError, match=r"all 4 images of data.unlabeled=.* are labelled training or validation images "
                                        r"\(4 labelled, 0 validation"):
        build_transfer_set_of(images, labelled)


def build_transfer_set_of(images, labelled):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        write_idx_images(Path(folder) / "train-images-idx3-ubyte", images)
        return build_transfer_set(folder, channels=1, labelled=labelled)


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root, "holds no images"),
    (lambda root: (root / "x.csv").write_text("1,2") and root / "x.csv", "neither an IDX images file nor a folder"),
])
def test_a_transfer_set_that_is_not_one_is_refused_with_what_to_point_at(tmp_path, make, message):
    with pytest.raises(CSKDError, match=message):
        build_transfer_set(str(make(tmp_path)), channels=1)


def test_the_training_images_are_the_split_then_the_transfer_set_with_one_fingerprint_of_both(tmp_path):
    split = ArrayImageDataset(random_images(4, seed=1), np.arange(4))
    write_idx_images(tmp_path / "train-images-idx3-ubyte", random_images(6, seed=2))
    assert training_images(split, None, 1) is split
    both = training_images(split, str(tmp_path), 1)
    assert isinstance(both, ConcatDataset) and len(both) == 10 and both[4][1] == UNLABELED
    write_idx_images(tmp_path / "train-images-idx3-ubyte", random_images(6, seed=3))
    other = training_images(split, str(tmp_path), 1)
    assert len({fingerprint(split), fingerprint(both), fingerprint(other)}) == 3


def test_the_stream_covers_every_image_once_per_pass_whatever_the_epoch_length():
    stream = TransferStream(size=10, per_epoch=4, seed=7)
    drawn = []
    for epoch in range(5):  # 20 positions: two full passes
        stream.set_epoch(epoch)
        drawn += stream.indices()
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each pass in a fresh order
    fresh = TransferStream(size=10, per_epoch=4, seed=7)
    fresh.set_epoch(3)  # a resumed run: epoch 3 without epochs 0-2
    assert fresh.indices() == drawn[12:16]
    assert TransferStream(size=10, per_epoch=4, seed=8).indices() != drawn[:4]


def test_ranks_share_out_each_epochs_stream():
    whole = TransferStream(size=9, per_epoch=6, seed=1)
    ranks = [TransferStream(size=9, per_epoch=6, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in range(3):
        for s in (whole, *ranks):
            s.set_epoch(epoch)
        expected = whole.indices()
        assert ranks[0].indices() == expected[0::2] and ranks[1].indices() == expected[1::2]


class FixedOrder:
    """A labelled sampler stand-in: a given order, recording the epoch it is set to."""

    def __init__(self, order):
        self.order, self.epoch = order, None

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)

    def set_epoch(self, epoch):
        self.epoch = epoch


def test_each_batch_is_the_labelled_images_then_ratio_times_as_many_transfer_images():
    labelled = FixedOrder([5, 0, 3, 1, 4, 2, 6])  # 7 labelled images, batch 3: 2 steps, the 7th dropped
    batches = MixedBatchSampler(labelled, 3, transfer_size=20, transfer_batch=6, labelled_count=7, seed=0)
    batches.set_epoch(2)
    got = list(batches)
    assert len(batches) == len(got) == 2 and labelled.epoch == 2
    assert [b[:3] for b in got] == [[5, 0, 3], [1, 4, 2]]
    transfer = [i - 7 for b in got for i in b[3:]]
    assert all(len(b) == 9 for b in got)
    stream = TransferStream(20, 12, seed=0)
    stream.set_epoch(2)
    assert transfer == stream.indices()
