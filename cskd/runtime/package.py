"""The model package: an engine file plus ``model.json`` describing how to feed and trust it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from cskd.errors import CSKDError
from cskd.files import atomic_write_text

PACKAGE_FORMAT = "cskd-model-package-2"
_LEGACY_FORMATS = ("cskd-model-package-1",)  # read and upgraded in memory
MODEL_JSON = "model.json"
# What `cskd bench` certified the package for (clean agreement with its teacher, the shift suite), beside model.json
ROBUSTNESS_JSON = "robustness.json"


@dataclass
class InputSpec:
    name: str  # the graph's input name
    dtype: str  # "float32" (normalised by the client) or "uint8" (raw pixels, normalised in the graph)
    layout: str  # "NCHW"
    channels: int
    size: int  # square side in pixels
    mean: List[float]
    std: List[float]
    resize: str = "bicubic"  # interpolation of the resize
    crop_pct: float = 1.0  # shorter side to size / crop_pct, then the centre size x size (timm's eval transform)


@dataclass
class ModelPackage:
    """What ``model.json`` holds. ``engine`` and ``files`` are relative to the package folder."""

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
    heads: List[str] = field(default_factory=list)  # the heads the prediction averages (students)
    engine_max_batch: Optional[int] = None  # the engine's own batch limit (TensorRT profile); None: any
    backend: Optional[str] = None  # the backend the parity gate passed on: serving and benchmarks use it by default
    build: Dict[str, Any] = field(default_factory=dict)  # how the engine was made (quantisation, TensorRT, GPU)
    parity: Dict[str, Any] = field(default_factory=dict)
    gate: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    toolkit: Dict[str, str] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)  # other artefacts: {"optimized": "model.optimized.onnx"}
    version: str = "1"
    format: str = PACKAGE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def batch_limit(self, wanted: int) -> int:
        """The largest batch to run: ``wanted``, capped by the engine's own limit where it has one."""
        return min(wanted, self.engine_max_batch) if self.engine_max_batch else wanted

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelPackage":
        data = dict(data)
        if data.get("format") in _LEGACY_FORMATS:
            data = _upgrade_v1(data)
        data["input"] = InputSpec(**data["input"])
        return cls(**data)


def _upgrade_v1(data: Dict[str, Any]) -> Dict[str, Any]:
    """Format 1 kept the TensorRT profile limit as ``input.max_batch`` and applied it to every engine."""
    inputs = dict(data["input"])
    max_batch = inputs.pop("max_batch", None)
    return {**data, "input": inputs, "format": PACKAGE_FORMAT,
            "engine_max_batch": max_batch if data.get("engine_format") == "trt" else None}


def read_package(model_dir: str | Path) -> ModelPackage:
    """Read and check ``model_dir/model.json``; errors say what is wrong and how to fix it."""
    folder = Path(model_dir)
    path = folder / MODEL_JSON
    if not path.is_file():
        raise CSKDError(f"{folder} is not a model package (no {MODEL_JSON}); create one with `cskd export RUN_DIR`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") not in (PACKAGE_FORMAT, *_LEGACY_FORMATS):
            raise ValueError(f"format is {data.get('format')!r}, expected {PACKAGE_FORMAT!r}")
        package = ModelPackage.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CSKDError(f"{path} is not a valid cskd model.json ({exc}); re-export the model") from None
    if not (folder / package.engine).is_file():
        raise CSKDError(f"{folder} lacks its engine file {package.engine}; re-export the model")
    return package


def write_package_json(folder: str | Path, package: ModelPackage) -> None:
    atomic_write_text(Path(folder) / MODEL_JSON, package.to_json())


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
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


@dataclass
class NamedPackage:
    """A package as a server serves it: under ``name`` (its own, unless the command line gave another)."""

    name: str
    folder: Path
    package: ModelPackage


def check_model_name(name: str, folder: Path) -> None:
    """A served name is one path segment of the URL (``/v2/models/NAME/infer``), as Triton requires."""
    if not name or name in (".", "..") or any(c in "/\\?#%" or c.isspace() for c in name) or not name.isprintable():
        raise CSKDError(f"the model name {name!r} ({folder}) is not one path segment: a client could not reach it at "
                        "/v2/models/NAME; name it with letters, digits, '-', '_' or '.' (NAME=PATH)")


def resolve_packages(references: List[str]) -> List[NamedPackage]:
    """The packages ``references`` name, in order: each a package folder, a folder of packages (a Triton
    model repository: every subfolder with a model.json, sorted), or ``NAME=PATH`` to serve one under
    another name. Two packages under one name are refused (two exports of one run share their name)."""
    found: List[NamedPackage] = []
    for reference in references:
        name, _, path = reference.partition("=") if "=" in reference and not Path(reference).exists() else ("", "", reference)
        folder = Path(path)
        if not (folder / MODEL_JSON).is_file() and folder.is_dir() and not name:
            folders = [p for p in sorted(folder.iterdir()) if (p / MODEL_JSON).is_file()]
            for inner in folders:
                package = read_package(inner)
                found.append(NamedPackage(package.name, inner, package))
            if folders:
                continue
        package = read_package(folder)
        found.append(NamedPackage(name or package.name, folder, package))
    seen: Dict[str, Path] = {}
    for entry in found:
        check_model_name(entry.name, entry.folder)
        if entry.name in seen:
            raise CSKDError(f"two packages are named {entry.name!r} ({seen[entry.name]} and {entry.folder}); serve one "
                            f"under another name with NAME=PATH, e.g. {entry.name}-2={entry.folder}")
        seen[entry.name] = entry.folder
    if not found:
        raise CSKDError("no model package given: pass MODEL_DIR or set CSKD_SERVE_MODEL_DIR")
    return found
