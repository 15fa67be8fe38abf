"""TensorRT export: builds and passes the parity gate where TensorRT and a GPU exist; else a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cskd.runtime.tensorrt import tensorrt_available

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; the missing-TensorRT message cannot be shown")
def test_trt_export_without_tensorrt_says_how_to_get_it(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cskd", "export", str(trained_run), "--format", "trt",
                           "--out", str(tmp_path / "trt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "pip install 'cskd[gpu]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "trt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engine_passes_the_parity_gate(trained_run, tmp_path, precision):
    from cskd.export.exporter import ExportOptions, export_model

    out, package = export_model(trained_run, ExportOptions(format="trt", precision=precision, out=tmp_path / precision,
                                                           max_batch=16, parity_images=200), log=print)
    assert (out / "model.engine").is_file() and package.parity["backend"] == "tensorrt"
    assert package.gate["passed"]
