"""The export targets: one table of formats, their engine files and valid precisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from cskd.errors import CSKDError, did_you_mean


@dataclass(frozen=True)
class ExportFormat:
    name: str
    engine_file: str  # file name inside the model package
    precisions: Tuple[str, ...]
    description: str


FORMATS = {
    "onnx": ExportFormat("onnx", "model.onnx", ("fp32", "fp16", "int8"), "ONNX for onnxruntime (CPU or GPU)"),
    "trt": ExportFormat("trt", "model.engine", ("fp32", "fp16", "int8"), "TensorRT engine (NVIDIA GPU)"),
}
INPUT_KINDS = ("float", "uint8")


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
