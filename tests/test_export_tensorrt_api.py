"""cskd's TensorRT code type-checks against TensorRT's real Python API, 10.x and 11.x.

TensorRT cannot be installed here; ``scripts/tensorrt_stubs.py`` (run by CI before the tests)
writes stubs of each bindings wheel's real classes, enums and signatures to ``.cache/tensorrt-stubs``.
mypy then checks every ``trt.`` name and call in cskd's TensorRT modules against each version, so a
name that TensorRT 11 removed (``BuilderFlag.FP16``, ``ILayer.precision``...) fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_layers import ROOT, installed_layout

STUBS = ROOT / ".cache" / "tensorrt-stubs"
VERSIONS = sorted(p.name for p in STUBS.iterdir()) if STUBS.is_dir() else []
MODULES = ["cskd/export/tensorrt.py", "cskd/runtime/tensorrt.py"]
needs_stubs = pytest.mark.skipif(not VERSIONS, reason="no TensorRT stubs: run `python scripts/tensorrt_stubs.py` (downloads "
                                                      "the bindings wheels from PyPI; CI does)")


def mypy(layout: Path, version: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(STUBS / version)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                           str(cache), *MODULES], cwd=layout, env=env, capture_output=True, text=True, timeout=600)


@needs_stubs
@pytest.mark.parametrize("version", VERSIONS)
def test_tensorrt_modules_type_check_against_the_real_api(tmp_path, version):
    proc = mypy(installed_layout(tmp_path / "layout"), version, ROOT / ".cache" / f"mypy-{version}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Success: no issues found in 2 source files" in proc.stdout


@needs_stubs
def test_a_name_tensorrt_11_removed_fails_the_check(tmp_path):
    layout = installed_layout(tmp_path / "layout")
    module = layout / "cskd" / "export" / "tensorrt.py"
    module.write_text(module.read_text() + "\n\ndef _uses_fp16(config: trt.IBuilderConfig) -> None:\n"
                      "    config.set_flag(trt.BuilderFlag.FP16)\n")
    results = {v: mypy(layout, v, ROOT / ".cache" / f"mypy-{v}") for v in VERSIONS}
    for version, proc in results.items():
        if version.startswith("11."):
            assert proc.returncode == 1 and '"type[BuilderFlag]" has no attribute "FP16"' in proc.stdout
        else:
            assert proc.returncode == 0, proc.stdout[-2000:]  # deprecated, still there in 10.x
