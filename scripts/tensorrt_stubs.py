"""Type stubs of TensorRT's real Python API, for checking cskd's TensorRT code on machines without it.

TensorRT's libraries cannot be installed here (PyPI's tensorrt-cu12/13-libs fetch them from NVIDIA's
own index), but the bindings wheels (tensorrt-cu12-bindings, tensorrt-cu13-bindings: the ~1 MB
Python extension) download from PyPI. This script loads each bindings wheel against do-nothing
stand-ins for libnvinfer / libnvinfer_plugin / libnvonnxparser (compiled here with the C compiler:
only the 9 entry points the extension links against), lets pybind11-stubgen write ``.pyi`` stubs of
every class, enum and method signature, and adds a ``tensorrt`` package that re-exports them.
``tests/test_export_tensorrt_api.py`` then runs mypy on cskd's TensorRT modules against each
version. (The PyPI ``tensorrt-stubs`` package, made by the same tool for 10.13, does not parse:
its .pyi files contain syntax errors, and it has no ``py.typed``.)

    python scripts/tensorrt_stubs.py                      # 10.0.1, 10.16.1.11 and 11.4.0.106 into .cache/tensorrt-stubs
    python scripts/tensorrt_stubs.py --versions 11.4.0.106 --out /tmp/stubs
"""

from __future__ import annotations

import argparse
import ast
import keyword
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "tensorrt-stubs"
DEFAULT_VERSIONS = ["10.0.1", "10.16.1.11", "11.4.0.106"]  # the oldest and newest 10.x, and 11
LIBRARIES = ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser")
# The TensorRT symbols the bindings extension imports (nm -D --undefined-only tensorrt.so).
STAND_IN = """
void* createInferBuilder_INTERNAL(void* a, int v){return 0;}
void* createInferRefitter_INTERNAL(void* a, void* b, int v){return 0;}
void* createInferRuntime_INTERNAL(void* a, int v){return 0;}
void* createNvOnnxParserRefitter_INTERNAL(void* a, void* b, int v){return 0;}
void* createNvOnnxParser_INTERNAL(void* a, void* b, int v){return 0;}
void* getBuilderPluginRegistry(int x){return 0;}
int getNvOnnxParserVersion(void){return 0;}
void* getPluginRegistry(void){return 0;}
int initLibNvInferPlugins(void* a, const char* b){return 0;}
"""


def run(command: list, **kwargs) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def split_parameters(text: str) -> list:
    """Top-level comma-separated parts of a parameter list (brackets nest)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{" and 1 or 0
        depth -= char in ")]}" and 1 or 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + ([current] if current.strip() else [])


def repair(stub: str) -> str:
    """Make pybind11-stubgen's output parse: parameters named after keywords (``in``) get a trailing
    underscore, and a parameter without a default after one with a default gets ``= ...``."""
    lines = []
    for line in stub.splitlines():
        match = re.match(r"^(\s*def \w+\()(.*)(\)\s*(->.*)?:\s*(\.\.\.)?\s*)$", line)
        if match:
            head, params, tail = match.group(1), match.group(2), match.group(3)
            fixed, seen_default = [], False
            for param in split_parameters(params):
                name = param.strip().split(":")[0].split("=")[0].strip().lstrip("*")
                if keyword.iskeyword(name):
                    param = param.replace(name, name + "_", 1)
                if "=" in param:
                    seen_default = True
                elif seen_default and not param.strip().startswith("*"):
                    param += " = ..."
                fixed.append(param)
            line = head + ",".join(fixed) + tail
        lines.append(line)
    return "\n".join(lines) + "\n"


def build(version: str, out: Path, work: Path) -> Path:
    major = version.split(".")[0]
    package = f"tensorrt-cu{12 if major == '10' else 13}-bindings"
    wheels = work / "wheels"
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
         f"{package}=={version}"])
    wheel = next(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    site = work / version
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site, [n for n in archive.namelist() if n.startswith("tensorrt_bindings/")])
    source = work / "stand_in.c"
    source.write_text(STAND_IN)
    for library in LIBRARIES:
        soname = f"{library}.so.{major}"
        run(["cc", "-shared", "-fPIC", "-o", str(site / "tensorrt_bindings" / soname), f"-Wl,-soname,{soname}", str(source)])
    target = out / version
    shutil.rmtree(target, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run([sys.executable, "-m", "pybind11_stubgen", "tensorrt_bindings.tensorrt", "-o", str(target), "--ignore-all-errors"],
        env=env)
    stub = target / "tensorrt_bindings" / "tensorrt.pyi"
    stub.write_text(repair(stub.read_text()))
    ast.parse(stub.read_text(), str(stub))  # a stub that does not parse would make every check pass
    (target / "tensorrt_bindings" / "__init__.pyi").write_text("from .tensorrt import *\n__version__: str\n")
    (target / "tensorrt").mkdir(parents=True, exist_ok=True)
    (target / "tensorrt" / "__init__.pyi").write_text("from tensorrt_bindings.tensorrt import *\n__version__: str\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=DEFAULT_VERSIONS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if shutil.which("cc") is None:
        sys.exit("tensorrt_stubs.py needs a C compiler (cc) for the stand-in libraries")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for version in args.versions:
            print(f"TensorRT {version}: stubs in {build(version, args.out, Path(work))}")


if __name__ == "__main__":
    main()
