"""cskd predict: the exported engine's labels for image files match the PyTorch model's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cskd.data.datasets import build_dataset
from cskd.data.transforms import eval_transform
from cskd.engine import Normalization
from cskd.export.exporter import ExportOptions, export_model
from cskd.runtime.preprocess import ImageDecodeError, decode_image
from cskd.tasks import load_trained


@pytest.fixture(scope="module")
def package_dir(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "pkg"
    export_model(trained_run, ExportOptions(out=out, parity_images=100), log=lambda _: None)
    return out


def write_val_pngs(folder, count: int):
    dataset, _ = build_dataset("fashion-mnist-demo", "val")
    paths = []
    for i in range(count):
        image, _ = dataset[i * 37]
        path = folder / f"val{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_predict_matches_the_pytorch_model_used_by_eval(trained_run, package_dir, tmp_path):
    paths = write_val_pngs(tmp_path, 24)
    proc = subprocess.run([sys.executable, "-m", "cskd", "predict", str(package_dir), *map(str, paths),
                           "--top-k", "3", "--json", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    predicted = [r["top"][0]["index"] for r in json.loads((tmp_path / "p.json").read_text())]
    # The eval pipeline: timm's eval transform and the checkpoint in PyTorch (cskd eval's code path).
    trained = load_trained(trained_run)
    model, spec = trained.model, trained.spec
    tf, norm = eval_transform(spec.img_size, 1), Normalization(spec.mean, spec.std)
    batch = torch.stack([tf(Image.open(p).convert("L")) for p in paths])
    with torch.inference_mode():
        expected = model(norm(batch)).argmax(1).tolist()
    assert predicted == expected
    first = json.loads((tmp_path / "p.json").read_text())[0]["top"]
    assert len(first) == 3 and first[0]["score"] >= first[1]["score"] >= first[2]["score"]
    assert str(paths[0]) in proc.stdout


def test_predict_refuses_a_file_that_is_not_an_image(package_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "cskd", "predict", str(package_dir), str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot decode the image" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_predict_refuses_a_folder_that_is_not_a_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cskd", "predict", str(tmp_path), "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is not a model package" in proc.stderr


def test_decode_applies_exif_orientation_and_channels():
    import io

    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, :10] = 255  # left half white
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue(), channels=1, size=20)
    assert out.shape == (1, 20, 20)
    assert out[0, :5].mean() > 200 and out[0, -5:].mean() < 50  # white moved to the top


def test_decode_rejects_bombs_and_garbage():
    import io

    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(buf.getvalue(), 1, 32, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, 1, 32)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 1, 32)
