"""The one-way house: import-linter's contracts (pyproject.toml) hold, and the code is lint-clean.

``cskd.export`` and ``cskd.serve`` live in top-level folders mapped by setuptools' package-dir, which
import-linter cannot see through an editable install; the test lays the package out as a wheel
installs it (Python files only) and lints that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(target: Path) -> Path:
    """Copy every package's .py files to where a wheel would put them; returns the import root."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    for package in config["packages"]:
        owner = max((name for name in mapping if package == name or package.startswith(name + ".")), key=len)
        source = ROOT / mapping[owner] / Path(*package.split(".")[len(owner.split(".")):])
        destination = target / Path(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, destination / module.name)
    return target


def lint_imports(import_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(import_root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=import_root, timeout=300)


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
