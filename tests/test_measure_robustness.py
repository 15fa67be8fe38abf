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
