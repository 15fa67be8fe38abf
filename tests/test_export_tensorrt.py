"""TensorRT export: builds every precision behind the parity gate where TensorRT and a GPU exist; else a clear error."""

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
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_engine_passes_the_parity_gate_and_records_where_it_runs(trained_run, tmp_path, precision):
    import json

    from cskd.export.exporter import ExportOptions, export_model
    from cskd.runtime.backends import create_backend

    out, package = export_model(trained_run, ExportOptions(format="trt", precision=precision, out=tmp_path / precision,
                                                           max_batch=16, parity_images=200), log=print)
    assert (out / "model.engine").is_file() and package.parity["backend"] == "tensorrt"
    assert package.gate["passed"] and package.engine_max_batch == 16
    facts = package.build["tensorrt"]
    assert facts["tensorrt"] and facts["gpu"] and facts["compute_capability"]
    data = json.loads((out / "model.json").read_text())
    data["build"]["tensorrt"]["tensorrt"] = "0.0.0"  # as if built by another TensorRT
    (out / "model.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="re-export it on this machine"):
        create_backend(out)
