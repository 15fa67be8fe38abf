"""Data: IDX reading, the embedded subset, ImageFolder, transforms and normalisation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from cskd.data.datasets import build_dataset
from cskd.data.idx import read_idx, read_idx_split
from cskd.data.samples import sample_images
from cskd.data.transforms import eval_transform, normalize, train_transform
from cskd.errors import CSKDError


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_round_trip_raw_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    got_images, got_labels = read_idx_split(tmp_path, "train")
    assert np.array_equal(got_images, images) and got_labels.tolist() == [3, 1, 4, 1, 5]


def test_truncated_or_foreign_idx_is_refused(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 2, 2)))
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(CSKDError, match="truncated"):
        read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(b"\x89PNG....")
    with pytest.raises(CSKDError, match="not an IDX file"):
        read_idx(tmp_path / "b")


def test_missing_data_folder_names_the_fix(tmp_path):
    with pytest.raises(CSKDError, match="set data.path"):
        build_dataset("fashion-mnist", "train", str(tmp_path / "nowhere"))


def test_embedded_demo_is_a_stratified_subset():
    train, info = build_dataset("fashion-mnist-demo", "train")
    val, _ = build_dataset("fashion-mnist-demo", "val")
    assert info.num_classes == 10 and info.channels == 1
    assert np.bincount(train.labels).tolist() == [1000] * 10
    assert np.bincount(val.labels).tolist() == [200] * 10
    image, label = val[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 10


def test_imagefolder_tree(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 16), (10, 20, 30)).save(tmp_path / split / cls / "a.png")
    dataset, info = build_dataset("imagefolder", "val", str(tmp_path), transform=eval_transform(16, 3))
    assert info.class_names == ["cat", "dog"] and info.channels == 3
    image, label = dataset[1]
    assert image.shape == (3, 16, 16) and label == 1
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 20, 30]) / 255, atol=1e-6)
    with pytest.raises(CSKDError, match="train/<class>"):
        build_dataset("imagefolder", "test", str(tmp_path))


def test_transforms_give_unnormalised_tensors_of_the_model_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    tf = train_transform(32, 1, "rand-m9-mstd0.5-inc1", (0.5, 1.0), 0.5, 0.25)
    for _ in range(5):
        x, geometry = tf(image)
        assert x.shape == (1, 32, 32) and x.min() >= 0 and x.max() <= 1
        x0, y0, x1, y1 = geometry["box"].tolist()
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and (x1 - x0) * (y1 - y0) >= 0.5 * 0.9  # scale >= 0.5 (rounding)
    x = eval_transform(32, 1)(image)
    assert x.shape == (1, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_normalize_per_channel():
    x = torch.ones(2, 3, 4, 4) * torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    y = normalize(x, (0.2, 0.2, 0.2), (0.1, 0.2, 0.4))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))


def test_the_recorded_crop_box_is_the_region_the_image_came_from():
    """Crop a known image with the recorded box by hand: it must equal the transform's output."""
    import torchvision.transforms.functional as TF

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    tf = train_transform(32, 1, None, (0.3, 1.0), 0.5, 0.0, "bilinear", 0.0)
    for seed in range(6):
        torch.manual_seed(seed)
        x, geometry = tf(image)
        x0, y0, x1, y1 = (geometry["box"] * 28).round().int().tolist()
        expected = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [32, 32], TF.InterpolationMode.BILINEAR)
        if geometry["flip"]:
            expected = TF.hflip(expected)
        assert torch.equal(x, TF.to_tensor(expected))


class _Tiny(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), i / 255), i


@pytest.mark.parametrize("count, skip", [(0, 0), (-2, 0), (3, -1)])
def test_a_sample_of_no_images_or_from_before_the_start_is_refused(count, skip):
    # a negative bound sliced the fixed order from its end: -2 took 8 of the 10 images
    with pytest.raises(CSKDError, match=f"cannot sample {count} images after the first {skip}: ask for 1 or more"):
        sample_images(_Tiny(), count, skip)


def test_a_sample_past_the_end_says_another_sample_took_the_images():
    assert len(sample_images(_Tiny(), 3, skip=8)[0]) == 2  # fewer where the data set ends
    with pytest.raises(CSKDError, match="the data set has 10 and the first 10 are another sample's"):
        sample_images(_Tiny(), 3, skip=10)


def test_an_image_folder_given_to_a_fashion_mnist_config_is_told_to_say_imagefolder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(CSKDError, match="image folder .* add data.name=imagefolder"):
        read_idx_split(tmp_path, "train")
