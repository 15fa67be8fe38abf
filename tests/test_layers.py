"""The one-way house: import-linter's contracts (pyproject.toml) hold, and the code is lint-clean.

``cskd.export`` and ``cskd.serve`` live in top-level folders mapped by setuptools' package-dir, which
import-linter cannot see through an editable install; scripts/lint_imports.py lays the package out as a
wheel installs it (Python files only) and lints that, for the tests and for a checkout alike.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from lint_imports import installed_layout, lint_imports  # noqa: E402  the script a checkout runs


def test_import_contracts_hold(tmp_path):
    proc = lint_imports(installed_layout(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in proc.stdout


def contract_name(contract_id: str) -> str:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c["name"] for c in contracts if c["id"] == contract_id)


@pytest.mark.parametrize("module, line, contract", [
    ("serve/settings.py", "import torch", "torch-free-serving"),
    ("runtime/package.py", "import cskd.serve.app", "layers"),
    ("export/formats.py", "import cskd.serve.errors", "layers"),
    ("models/student.py", "import cskd.runtime.package", "core-without-runtime"),
    ("checkpoint.py", "import cskd.models", "no-cycles"),
])
def test_a_wrong_way_import_breaks_its_contract(tmp_path, module, line, contract):
    root = installed_layout(tmp_path)
    path = root / "cskd" / module
    path.write_text(f"{line}  # injected by the test\n" + path.read_text())
    proc = lint_imports(root)
    assert proc.returncode != 0
    squeeze = lambda text: "".join(text.split())  # import-linter wraps long names
    assert squeeze(contract_name(contract) + "BROKEN") in squeeze(proc.stdout)


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install 'cskd[dev]')")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
