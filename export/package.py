"""The model package: an engine file plus ``model.json`` describing how to feed and trust it.

This module imports neither torch nor onnxruntime: the serving path reads packages with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List

from cskd.errors import CSKDError

PACKAGE_FORMAT = "cskd-model-package-1"
MODEL_JSON = "model.json"


@dataclass
class InputSpec:
    name: str  # the graph's input name
    dtype: str  # "float32" (normalised by the client) or "uint8" (raw pixels, normalised in the graph)
    layout: str  # "NCHW"
    channels: int
    size: int  # square side in pixels
    mean: List[float]
    std: List[float]
    resize: str = "bicubic"  # how the client resizes images to `size`
    max_batch: int = 32


@dataclass
class ModelPackage:
    """What ``model.json`` holds. ``engine`` is relative to the package folder."""

    name: str
    role: str  # "student" or "teacher"
    architecture: str
    engine: str
    engine_format: str  # "onnx" or "trt"
    precision: str  # "fp32", "fp16" or "int8"
    fused: bool
    input: InputSpec
    outputs: List[str]
    classes: List[str]
    parity: Dict[str, Any] = field(default_factory=dict)
    gate: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    toolkit: Dict[str, str] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)  # other artefacts: {"optimized": "model.optimized.onnx"}
    version: str = "1"
    format: str = PACKAGE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelPackage":
        data = dict(data)
        data["input"] = InputSpec(**data["input"])
        return cls(**data)


def read_package(model_dir: str | Path) -> ModelPackage:
    """Read and check ``model_dir/model.json``; errors say what is wrong and how to fix it."""
    folder = Path(model_dir)
    path = folder / MODEL_JSON
    if not path.is_file():
        raise CSKDError(f"{folder} is not a model package (no {MODEL_JSON}); create one with `cskd export RUN_DIR`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != PACKAGE_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {PACKAGE_FORMAT!r}")
        package = ModelPackage.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CSKDError(f"{path} is not a valid cskd model.json ({exc}); re-export the model") from None
    if not (folder / package.engine).is_file():
        raise CSKDError(f"{folder} lacks its engine file {package.engine}; re-export the model")
    return package


@contextmanager
def staged_package(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    A failure (or a refused parity gate) leaves ``out`` as it was and removes the staging folder.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CSKDError(f"{out} already exists and is not empty; pass --force to replace it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise CSKDError(f"cannot write to {out.parent} ({exc.strerror}); choose a writable --out") from None
    try:
        yield staging
        os.chmod(staging, 0o755)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_package_json(folder: Path, package: ModelPackage) -> None:
    (Path(folder) / MODEL_JSON).write_text(package.to_json())
