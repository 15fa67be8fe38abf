"""The export targets: one table of formats, each with its precisions, preflight check, build
function and the files it writes into the package."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from cskd.errors import CSKDError, did_you_mean
from cskd.export import onnx_export, tensorrt
from cskd.export.quantize import quantize_int8

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
    channels: int
    size: int
    max_batch: int
    cache_dir: Path  # long-lived caches (TensorRT timing cache)
    log: Callable[[str], None] = print


@dataclass
class BuiltEngine:
    """What a build wrote: the engine file, other artefacts, the engine's batch limit and build facts."""

    engine: str
    files: Dict[str, str] = field(default_factory=dict)
    engine_max_batch: Optional[int] = None  # None: any batch size
    build: Dict[str, Any] = field(default_factory=dict)


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
        built.build["quantization"] = quantize_int8(fp32_path, target, batches)
    onnx_export.set_metadata_file(target, ctx.metadata)
    fp32_path.unlink()
    return built


def build_trt(ctx: BuildContext) -> BuiltEngine:
    """The typed ONNX of :func:`build_onnx`, built into a TensorRT engine (kept beside it)."""
    onnx_built = build_onnx(ctx)
    ctx.log("building the TensorRT engine (minutes on a first build; the timing cache speeds up the next)")
    facts = tensorrt.build_engine(ctx.stage / ONNX_FILE, ctx.stage / ENGINE_FILE, ctx.precision, ctx.max_batch,
                                  ctx.channels, ctx.size, cache_dir=ctx.cache_dir)
    return BuiltEngine(ENGINE_FILE, {"onnx": ONNX_FILE}, ctx.max_batch, {**onnx_built.build, "tensorrt": facts})


def _no_preflight() -> None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str
    precisions: Tuple[str, ...]
    build: Callable[[BuildContext], BuiltEngine]
    preflight: Callable[[], Any] = _no_preflight  # raises CSKDError when the format cannot run here


FORMATS = {
    "onnx": ExportFormat("onnx", "ONNX for onnxruntime (CPU or GPU)", PRECISIONS, build_onnx),
    "trt": ExportFormat("trt", "TensorRT engine (NVIDIA GPU)", PRECISIONS, build_trt, tensorrt.preflight),
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
