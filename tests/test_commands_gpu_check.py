"""cskd gpu-check: the self-check's table and exit code (its CPU dry run; the real one needs a GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dry_run_on_the_cpu_passes_and_skips_tensorrt(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cskd", "gpu-check", str(trained_run), "--device", "cpu", "--out",
                           str(tmp_path), "--requests", "48"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = {line.split("  ")[0].strip(): line for line in proc.stdout.splitlines()}
    for precision in ("fp32", "fp16", "int8"):
        assert "SKIP" in lines[f"export trt {precision}"] and "TensorRT needs a CUDA device" in lines[f"export trt {precision}"]
        assert "PASS" in lines[f"export onnx {precision}"] and "onnxruntime on CPUExecutionProvider" in lines[f"export onnx {precision}"]
    assert "48 requests from 16 clients: all 200, all equal to cskd predict" in proc.stdout
    assert "0 failed, 3 skipped" in proc.stdout


def test_without_a_gpu_the_check_fails_at_once_and_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    proc = subprocess.run([sys.executable, "-m", "cskd", "gpu-check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device is visible" in proc.stdout and "FAIL" in proc.stdout
