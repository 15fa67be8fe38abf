"""The export targets: one table of formats, each with its precisions, preflight check, build
function and the files it writes into the package."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from cskd.errors import CSKDError, did_you_mean
from cskd.export import onnx_export, tensorrt
from cskd.export.quantize import Tuning, quantize_int8
from cskd.files import atomic_write_text
from cskd.runtime.package import ModelPackage
from cskd.runtime.triton import model_config, to_pbtxt

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_KINDS = ("float", "uint8")
ONNX_FILE, OPTIMIZED_FILE, ENGINE_FILE = "model.onnx", "model.optimized.onnx", "model.engine"


@dataclass
class BuildContext:
    """What a format's build function gets: the module to export and where to write."""

    stage: Path  # the package folder being written
    module: torch.nn.Module  # DeployModule: input -> logits (and probabilities)
    example: torch.Tensor  # a real input batch for tracing
    output_names: List[str]
    precision: str
    metadata: Dict[str, str]  # written into the ONNX metadata_props
    calibration: Callable[[], List[np.ndarray]]  # int8: batches of real training images (loaded on demand)
    tuning: Optional[Callable[[], Tuning]]  # int8: images to choose the quantisation on (None: the recipe as is)
    channels: int
    size: int
    max_batch: int
    cache_dir: Path  # long-lived caches (TensorRT timing cache)
    log: Callable[[str], None] = print
    name: str = "model"  # the package's model name (a Triton repository's model folder)
    engine: Optional[str] = None  # --format triton: the engine inside, onnx (default) or trt


@dataclass
class BuiltEngine:
    """What a build wrote: the engine file, other artefacts, the engine's batch limit and build facts."""

    engine: str
    files: Dict[str, str] = field(default_factory=dict)
    engine_max_batch: Optional[int] = None  # None: any batch size
    build: Dict[str, Any] = field(default_factory=dict)
    package_dir: str = ""  # where model.json goes, relative to the output folder
    engine_format: str = "onnx"  # what runs the engine: onnx (onnxruntime) or trt (TensorRT)


def build_onnx(ctx: BuildContext) -> BuiltEngine:
    """fp32 ONNX (plus onnxruntime's optimised graph), or its fp16 / int8 conversion."""
    fp32_path = ctx.stage / (ONNX_FILE if ctx.precision == "fp32" else "model.fp32.onnx")
    onnx_export.export_fp32(ctx.module, fp32_path, ctx.example, ctx.output_names, ctx.metadata)
    built = BuiltEngine(ONNX_FILE)
    if ctx.precision == "fp32":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_export.optimize(fp32_path, ctx.stage / OPTIMIZED_FILE, onnx_export.transformer_dims(ctx.module))
        built.files["optimized"] = OPTIMIZED_FILE
        return built
    target = ctx.stage / ONNX_FILE
    if ctx.precision == "fp16":
        onnx_export.convert_fp16(fp32_path, target)
    else:
        batches = ctx.calibration()
        ctx.log(f"calibrating int8 on {sum(len(b) for b in batches)} training images")
        built.build["quantization"] = quantize_int8(fp32_path, target, batches, ctx.tuning() if ctx.tuning else None, ctx.log)
    onnx_export.set_metadata_file(target, ctx.metadata)
    fp32_path.unlink()
    return built


def build_trt(ctx: BuildContext) -> BuiltEngine:
    """The typed ONNX of :func:`build_onnx`, built into a TensorRT engine (kept beside it)."""
    onnx_built = build_onnx(ctx)
    ctx.log("building the TensorRT engine (minutes on a first build; the timing cache speeds up the next)")
    facts = tensorrt.build_engine(ctx.stage / ONNX_FILE, ctx.stage / ENGINE_FILE, ctx.precision, ctx.max_batch,
                                  ctx.channels, ctx.size, cache_dir=ctx.cache_dir)
    return BuiltEngine(ENGINE_FILE, {"onnx": ONNX_FILE}, ctx.max_batch, {**onnx_built.build, "tensorrt": facts},
                       engine_format="trt")


TRITON_ENGINES = {"onnx": build_onnx, "trt": build_trt}
TRITON_VERSION = "1"


def build_triton(ctx: BuildContext) -> BuiltEngine:
    """A Triton model repository: ``NAME/config.pbtxt`` and the engine in ``NAME/1/`` (model.json in
    ``NAME/``, so ``cskd serve OUT/NAME`` serves the same folder)."""
    engine = ctx.engine or "onnx"
    version_dir = ctx.stage / ctx.name / TRITON_VERSION
    version_dir.mkdir(parents=True)
    built = TRITON_ENGINES[engine](replace(ctx, stage=version_dir))
    prefix = f"{TRITON_VERSION}/"
    return replace(built, engine=prefix + built.engine, files={k: prefix + v for k, v in built.files.items()},
                   package_dir=ctx.name)


def write_triton_config(model_dir: Path, package: ModelPackage, max_batch: int) -> None:
    """``config.pbtxt`` beside the version folder: platform, batching and tensors of the engine."""
    atomic_write_text(model_dir / "config.pbtxt", to_pbtxt(model_config(package, model_dir.name, max_batch)))


def _no_preflight(engine: Optional[str]) -> None:
    return None


def _trt_preflight(engine: Optional[str]) -> Any:
    return tensorrt.preflight()


def _triton_preflight(engine: Optional[str]) -> Any:
    if (engine or "onnx") not in TRITON_ENGINES:
        raise CSKDError(f"--engine {engine} is not one of {', '.join(TRITON_ENGINES)} for --format triton")
    return tensorrt.preflight() if engine == "trt" else None


def _no_finish(model_dir: Path, package: ModelPackage, max_batch: int) -> None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str
    precisions: Tuple[str, ...]
    build: Callable[[BuildContext], BuiltEngine]
    preflight: Callable[[Optional[str]], Any] = _no_preflight  # raises CSKDError when the format cannot run here
    finish: Callable[[Path, ModelPackage, int], None] = _no_finish  # writes what needs the finished package


FORMATS = {
    "onnx": ExportFormat("onnx", "ONNX for onnxruntime (CPU or GPU)", PRECISIONS, build_onnx),
    "trt": ExportFormat("trt", "TensorRT engine (NVIDIA GPU)", PRECISIONS, build_trt, _trt_preflight),
    "triton": ExportFormat("triton", "Triton Inference Server model repository (ONNX or TensorRT inside)", PRECISIONS,
                           build_triton, _triton_preflight, write_triton_config),
}


def check_export_args(fmt: str, precision: str, input_kind: str) -> ExportFormat:
    """Validate the format, precision and input kind together; return the format's entry."""
    if fmt not in FORMATS:
        raise CSKDError(f"unknown export format {fmt!r}{did_you_mean(fmt, FORMATS)}; choose one of {', '.join(FORMATS)}")
    entry = FORMATS[fmt]
    if precision not in entry.precisions:
        raise CSKDError(
            f"--precision {precision} is not available for --format {fmt}{did_you_mean(precision, entry.precisions)}; "
            f"choose one of {', '.join(entry.precisions)}"
        )
    if input_kind not in INPUT_KINDS:
        raise CSKDError(f"--input {input_kind} is not one of {', '.join(INPUT_KINDS)}")
    return entry
