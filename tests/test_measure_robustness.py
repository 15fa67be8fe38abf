"""The shift suite's figures worked by hand from models whose answers are set per call, and the
suite as cskd bench runs it on real packages (robustness.json, the gate)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cskd.errors import CSKDError
from cskd.measure.robustness import ShiftOptions, SuiteModel, format_suite, gate_failures, run_shift_suite

LABELS = np.arange(100) % 10
IMAGES = np.zeros((100, 1, 8, 8), dtype=np.uint8)


def scripted(shares):
    """A model right on the first ``share`` of the images at its k-th call (clean first, then each cell)."""
    calls = iter(shares)

    def predict(images):
        right = int(round(next(calls) * len(images)))
        return np.where(np.arange(len(images)) < right, LABELS, (LABELS + 1) % 10)

    return predict


def test_figures_are_the_formulas_on_known_answers():
    options = ShiftOptions(images=100, families=["digital", "geometric"], severities=[1, 2])  # 4 + 3 shifts x 2 = 14 cells
    student = [0.8] + [0.4, 0.2] * 4 + [0.7, 0.6] * 3
    teacher = [0.9] + [0.6, 0.5] * 4 + [0.8, 0.8] * 3
    models = [SuiteModel("T", "teacher", scripted(teacher)), SuiteModel("S", "student", scripted(student), ["geometric"])]
    result = run_shift_suite(models, IMAGES, LABELS, options)
    assert result["clean"] == {"T": 90.0, "S": 80.0}
    contrast = next(r for r in result["per_shift"] if r["shift"] == "contrast")
    assert contrast["top1"] == {"T": pytest.approx(55.0), "S": pytest.approx(30.0)}
    assert contrast["relative"]["S"] == pytest.approx(30 / 80) and contrast["kept_vs_teacher"]["S"] == pytest.approx((30 / 80) / (55 / 90))
    # agreement: both right on the first min(share) images, both wrong (+1) on those neither gets right
    assert contrast["agreement"]["S"] == pytest.approx(np.mean([100 - (60 - 40), 100 - (50 - 20)]))
    s = result["summary"]["S"]
    assert s["mca"] == pytest.approx(30.0) and s["relative_robustness"] == pytest.approx(30 / 80)
    assert s["mce_vs_teacher"] == pytest.approx(100 * (60 + 80) / (40 + 50))  # summed errors over severities, per corruption
    assert s["geometric_top1"] == pytest.approx(65.0)
    assert s["unseen"]["mca"] == pytest.approx(30.0) and s["unseen"]["corruptions"] == 4  # geometric was seen: not in it
    assert [r["seen"]["S"] for r in result["per_shift"]] == [False] * 4 + [True] * 3
    assert set(s["below_ratio"]) == {"contrast", "elastic_transform", "pixelate", "jpeg_compression"}  # 0.61x < 0.8
    assert result["warnings"] and "contrast (0.61x)" in result["warnings"][0]
    assert gate_failures(result, 0.5) == [] and len(gate_failures(result, 0.7)) == 4
    table = format_suite(result)
    assert "translate*" in table and "0.61x  <" in table and "unseen families only (4 corruptions)" in table


@pytest.mark.parametrize("options,match", [(ShiftOptions(severities=[0]), "severities"), (ShiftOptions(families=["rain"]), "families"),
                                           (ShiftOptions(min_ratio=80), "share of the teacher"),
                                           (ShiftOptions(images=0), "positive count")])
def test_options_the_suite_cannot_run_are_refused(options, match):
    models = [SuiteModel("T", "teacher", scripted([1.0] * 200))]
    with pytest.raises(CSKDError, match=match):
        run_shift_suite(models, IMAGES, LABELS, options)


def test_bench_records_the_suite_with_each_student_package_and_gates_on_it(trained_run, tmp_path):
    from cskd.export.exporter import ExportOptions, export_model
    from cskd.measure.bench import BenchOptions, run_bench
    from cskd.runtime.package import read_package

    student, _ = export_model(trained_run, ExportOptions(out=tmp_path / "student", parity_images=100), log=lambda _: None)
    teacher, _ = export_model(trained_run, ExportOptions(out=tmp_path / "teacher", teacher=True, parity_images=100), log=lambda _: None)
    options = BenchOptions(batch_sizes=(1,), rounds=1, iters=2, warmup=1, eval_images=120, out=tmp_path / "bench",
                           shifts=ShiftOptions(images=60, families=["noise"], severities=[1, 5], min_ratio=1.5))
    result = run_bench([student], teacher, options, log=lambda _: None)
    record = json.loads((student / "robustness.json").read_text())
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert record["teacher"]["engine_sha256"] == hashlib.sha256((teacher / read_package(teacher).engine).read_bytes()).hexdigest()
    assert set(record["shifts"]) == {"gaussian_noise", "shot_noise", "impulse_noise"} and record["images"] == 60
    row = next(r for r in saved["rows"] if r["role"] == "student")
    assert record["clean"]["agreement_with_teacher"] == pytest.approx(row["agreement_with_teacher"])
    assert record["shifts"]["shot_noise"]["top1"] == pytest.approx(saved["shifts"]["per_shift"][1]["top1"][row["model"]])
    assert any("--min-robustness-ratio is 1.5" in f for f in result["failures"])  # a student cannot keep 1.5x on all three
    assert (tmp_path / "bench" / "shifts.png").stat().st_size > 5000


def _colour_or_grey_folder(root, channels: int) -> None:
    """``root/{train,val}/c<i>/`` with six smooth images a class (grey or colour): the README's own data."""
    from PIL import Image

    rng = np.random.default_rng(channels)
    yy, xx = np.mgrid[0:36, 0:36] / 36.0
    for split in ("train", "val"):
        for cls in range(10):
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(6):
                planes = [0.5 + 0.45 * np.sin((cls + 1) * xx * 3 + rng.random() * 2 + c) for c in range(channels)]
                pixels = (np.clip(np.stack(planes, -1), 0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"{k}.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_folder_run_with_the_invariance_recipe_is_certified_apart_on_the_shifts_it_never_saw(tmp_path, channels):
    """Own data, grey and colour: a cached teacher over the folder, the recipe on, the export records
    the families it trained on, and the suite summarises the other families apart."""
    import torch

    from cskd.checkpoint import ModelSpec, save_weights
    from cskd.config import load_config
    from cskd.data.invariance import get_recipe
    from cskd.export.exporter import ExportOptions, export_model
    from cskd.measure.bench import BenchOptions, run_bench
    from cskd.models import create_teacher
    from cskd.teachers import cache_teacher
    from cskd.train import train

    _colour_or_grey_folder(tmp_path / "data", channels)
    torch.manual_seed(0)
    teacher = create_teacher("cskd_resnet_micro", 10, channels, output_stride=8).model
    spec = ModelSpec("teacher", "cskd_resnet_micro", 10, channels, 32, kwargs={"output_stride": 8},
                     mean=(0.5,) * channels, std=(0.25,) * channels)
    save_weights(tmp_path / "teacher.safetensors", teacher.state_dict(), spec)
    overrides = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", f"data.channels={channels}",
                 "data.workers=0", "data.invariance=tone-affine", "data.auto_augment=null", "data.mixup=0", "data.cutmix=0",
                 "teacher.model=cskd_resnet_micro", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                 f"teacher.cache={tmp_path / 'cache'}", f"output={tmp_path / 'run'}",
                 "train.epochs=1", "train.batch_size=20", "train.warmup_epochs=0",
                 "student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
    cfg = load_config(None, overrides)
    cache_teacher(cfg, tmp_path / "cache", show_progress=False)
    train(cfg, show_progress=False)

    student, package = export_model(tmp_path / "run", ExportOptions(out=tmp_path / "student", parity_images=20), log=lambda _: None)
    reference, _ = export_model(tmp_path / "run", ExportOptions(out=tmp_path / "teacher", teacher=True, parity_images=20,
                                                                        data="imagefolder", data_path=str(tmp_path / "data")),
                                log=lambda _: None)
    assert package.source["invariance"] == "tone-affine"
    assert package.source["trained_shifts"] == list(get_recipe("tone-affine").trained_shifts)
    options = BenchOptions(batch_sizes=(1,), rounds=1, iters=1, warmup=0, eval_images=60, out=tmp_path / "bench",
                           shifts=ShiftOptions(images=30, families=["digital", "blur"], severities=[3]))
    result = run_bench([student], reference, options, log=lambda _: None)
    label = next(r["model"] for r in result["rows"] if r["role"] == "student")
    summary = result["shifts"]["summary"][label]
    assert summary["trained_shifts"] == ["digital", "geometric"]
    assert summary["unseen"]["corruptions"] == 4  # the blur family only: defocus, glass, motion, zoom
    blur = [r for r in result["shifts"]["per_shift"] if r["family"] == "blur"]
    assert summary["unseen"]["mca"] == pytest.approx(np.mean([r["top1"][label] for r in blur]))
    assert json.loads((student / "robustness.json").read_text())["images"] == 30
