"""Shared fixtures: tiny models and quick configs so the suite runs on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

import cskd.models  # noqa: F401  (registers the demo architectures)

torch.set_num_threads(2)

# A one-block student: same code path as any distilled DeiT, a fraction of the cost.
TINY_STUDENT = dict(embed_dim=32, depth=1, num_heads=2)


@pytest.fixture
def tiny_student():
    from cskd.models import create_student

    torch.manual_seed(0)
    return create_student("cskd_deit_nano_distilled_patch4_32", 10, img_size=32, patch_size=4, in_chans=1, **TINY_STUDENT)


def quick_overrides(tmp_path, **extra) -> list[str]:
    """Overrides for a few-second CSKD run on the embedded data with the packaged teacher."""
    values = {
        "output": str(tmp_path / "run"),
        "data.max_train": 256,
        "data.max_val": 128,
        "data.workers": 0,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.warmup_epochs": 0,
        "student.kwargs": "{embed_dim: 32, depth: 1, num_heads: 2}",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory) -> list[str]:
    """Overrides for a random-weight micro ResNet teacher with the demo teacher's 4x4 grid at a tenth
    of its cost: what the cache's mechanics (shards, resume, ranks) are tested with."""
    from cskd.checkpoint import ModelSpec, save_weights
    from cskd.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from cskd.models import create_teacher

    torch.manual_seed(0)
    kwargs = {"output_stride": 8}
    model = create_teacher("cskd_resnet_micro", 10, 1, **kwargs).model
    spec = ModelSpec("teacher", "cskd_resnet_micro", 10, 1, 32, kwargs=kwargs, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    path = tmp_path_factory.mktemp("teacher") / "micro.safetensors"
    save_weights(path, model.state_dict(), spec)
    return ["teacher.model=cskd_resnet_micro", f"teacher.checkpoint={path}"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A demo-architecture student distilled for 3 epochs on 3,000 images (about 20 s on 2 cores)."""
    from cskd.config import load_config
    from cskd.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(None, [f"output={out}", "data.max_train=3000", "data.max_val=500", "data.workers=0",
                             "train.epochs=3", "train.warmup_epochs=0"])
    train(cfg, show_progress=False)
    return out


def val_images(count: int, size: int = 32):
    """``count`` embedded validation images as uint8 [N,1,size,size] (eval transform) and labels."""
    import numpy as np

    from cskd.data.datasets import build_dataset
    from cskd.data.transforms import eval_transform

    dataset, _ = build_dataset("fashion-mnist-demo", "val", transform=eval_transform(size, 1))
    step = len(dataset) // count
    items = [dataset[i * step] for i in range(count)]
    images = np.stack([(x.numpy() * 255).round().astype(np.uint8) for x, _ in items])
    return images, np.array([y for _, y in items])


def write_imagefolder(root, sizes, classes: int = 10, suffix: str = "png", seed: int = 0) -> None:
    """``root/{train,val}/c<i>/a.<suffix>``: one random grayscale image per class, class ``i`` of size
    ``sizes[i % len(sizes)]`` as (width, height); ten classes fit the micro teacher."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in range(classes):
            width, height = sizes[cls % len(sizes)]
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L").save(folder / f"a.{suffix}")


def write_idx_images(path, images) -> None:
    """An IDX3 uint8 file (gzipped when the name ends in .gz), as Fashion-MNIST ships them."""
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", *images.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + images.astype("uint8").tobytes())


def random_images(count: int, seed: int = 0):
    """``count`` random uint8 28x28 grayscale images."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)
