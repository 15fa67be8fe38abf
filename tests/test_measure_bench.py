"""cskd bench on tiny exported models: fields, ordered percentiles, the speedup and accuracy gates."""

from __future__ import annotations

import json
import time

import pytest

import cskd.measure.bench
from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.bench import BenchOptions, run_bench


@pytest.fixture(scope="module")
def packages(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    student, _ = export_model(trained_run, ExportOptions(out=root / "student", parity_images=100), log=lambda _: None)
    teacher, _ = export_model(trained_run, ExportOptions(out=root / "teacher", teacher=True, parity_images=100),
                              log=lambda _: None)
    return student, teacher


def slow_down(monkeypatch, role: str, seconds: float) -> None:
    """Make every backend of ``role`` sleep before each call: a deliberately slow model."""
    real = cskd.measure.bench.create_backend

    def create(folder, *args, **kwargs):
        backend, package = real(folder, *args, **kwargs)
        if package.role == role:
            infer = backend.infer
            backend.infer = lambda batch: (time.sleep(seconds), infer(batch))[1]
        return backend, package

    monkeypatch.setattr(cskd.measure.bench, "create_backend", create)


def quick(tmp_path, **kwargs) -> BenchOptions:
    kwargs.setdefault("shifts", None)  # the shift suite has its own tests (test_measure_robustness.py)
    return BenchOptions(batch_sizes=(1, 4), rounds=2, iters=4, warmup=1, eval_images=200, out=tmp_path, **kwargs)


def test_bench_json_has_every_field_and_ordered_percentiles(packages, tmp_path):
    student, teacher = packages
    result = run_bench([student], teacher, quick(tmp_path))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["rows"]) == 4  # 2 models x 2 batch sizes
    for row in saved["rows"]:
        assert {"model", "role", "precision", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "images_per_s",
                "top1", "speedup_vs_teacher"} <= set(row)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert 0 <= row["top1"] <= 100
    teacher_rows = [r for r in saved["rows"] if r["role"] == "teacher"]
    assert all(r["speedup_vs_teacher"] == pytest.approx(1.0) for r in teacher_rows)
    assert {"machine", "options", "failures"} <= set(saved)
    assert all((tmp_path / name).stat().st_size > 5000 for name in ("latency.png", "accuracy_latency.png"))
    assert result["failures"] == []


def test_speedup_gate_passes_when_the_teacher_is_slower(packages, tmp_path, monkeypatch):
    student, teacher = packages
    slow_down(monkeypatch, "teacher", 0.03)
    result = run_bench([student], teacher, quick(tmp_path, expect_speedup=2.0))
    assert result["failures"] == []
    assert all(r["speedup_vs_teacher"] >= 2.0 for r in result["rows"] if r["role"] == "student")


def test_speedup_gate_fails_when_the_student_is_made_slower(packages, tmp_path, monkeypatch):
    student, teacher = packages
    slow_down(monkeypatch, "student", 0.03)
    result = run_bench([student], teacher, quick(tmp_path, expect_speedup=2.0))
    assert result["failures"] and all("expected at least 2.0x" in f for f in result["failures"])


def test_accuracy_gate_compares_with_the_teachers_top1(packages, tmp_path):
    student, teacher = packages
    result = run_bench([student], teacher, quick(tmp_path, max_accuracy_drop=0.0))
    rows = {r["role"]: r["top1"] for r in result["rows"] if r["batch"] == 1}
    drop = rows["teacher"] - rows["student"]
    assert bool(result["failures"]) == (drop > 0)  # the 3-epoch student is below the teacher


def test_cli_bench_exits_non_zero_on_a_failed_gate(packages, tmp_path):
    import subprocess
    import sys

    student, teacher = packages
    proc = subprocess.run([sys.executable, "-m", "cskd", "bench", str(student), "--teacher", str(teacher), "--quick",
                           "--batch-sizes", "1", "--expect-speedup", "1000", "--out", str(tmp_path),
                           "--shift-families", "noise", "--shift-severities", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "gate failed" in proc.stderr
    assert "speedup" in proc.stdout and "gaussian_noise" in proc.stdout and "mCE vs teacher" in proc.stdout
    assert (student / "robustness.json").is_file() and (tmp_path / "shifts.png").stat().st_size > 5000


def test_agreement_with_the_teacher_is_the_share_of_images_both_classify_alike(packages, tmp_path):
    import numpy as np

    from cskd.evaluate import ModelInput, real_images
    from cskd.runtime.backends import create_backend
    from cskd.runtime.preprocess import to_engine_input

    student, teacher = packages
    result = run_bench([student], teacher, quick(tmp_path))
    predicted = {}
    for role, folder in (("student", student), ("teacher", teacher)):  # the expectation, from the engines directly
        backend, package = create_backend(folder)
        model_input = ModelInput(package.input.channels, package.input.size, len(package.classes), tuple(package.classes))
        images, _ = real_images(folder, model_input, "val", 200)
        spec = package.input
        predicted[role] = backend.infer(to_engine_input(images, spec.dtype, spec.mean, spec.std)).argmax(1)
    expected = 100.0 * float(np.mean(predicted["student"] == predicted["teacher"]))
    rows = {r["role"]: r["agreement_with_teacher"] for r in result["rows"] if r["batch"] == 1}
    assert rows == {"teacher": 100.0, "student": pytest.approx(expected)} and 0 < expected < 100
