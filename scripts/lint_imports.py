"""Run import-linter's contracts (pyproject.toml) on a checkout.

``lint-imports`` cannot run in a checkout as it is: ``cskd.export`` and ``cskd.serve`` live in the
top-level folders export/ and serve/, mapped by setuptools' package-dir, which import-linter cannot see
through an editable install. This script lays the package out as a wheel installs it (Python files
only, in a temporary folder) and lints that; tests/test_layers.py uses the same two functions.

    python3 scripts/lint_imports.py          # exit status 0 when every contract is kept
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

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


def lint_imports(import_root: Path, capture: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(import_root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=capture, text=True, env=env, cwd=import_root, timeout=300)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        sys.exit(lint_imports(installed_layout(Path(folder)), capture=False).returncode)
