"""Triton Inference Server model configuration (``config.pbtxt``) for a model package.

One description serves both places that need it: ``cskd export --format triton`` writes it as
protobuf text into a model repository, and ``cskd serve`` answers Triton's model-configuration
extension (``GET /v2/models/{name}/config``) with the same fields as JSON.
"""

from __future__ import annotations

from typing import Any, Dict

from cskd.runtime.package import ModelPackage

PLATFORMS = {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}
_TYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8", "float16": "TYPE_FP16"}


def model_config(package: ModelPackage, name: str, max_batch_size: int, max_queue_delay_us: int = 5000,
                 instances: int = 1) -> Dict[str, Any]:
    """Triton's ``ModelConfig`` for ``package`` as a dict of its protobuf fields (dims exclude the
    batch axis because ``max_batch_size`` > 0)."""
    spec = package.input
    outputs = [{"name": out, "data_type": "TYPE_FP32", "dims": [len(package.classes)]} for out in package.outputs]
    return {
        "name": name,
        "platform": PLATFORMS[package.engine_format],
        "max_batch_size": max_batch_size,
        "input": [{"name": spec.name, "data_type": _TYPES[spec.dtype], "dims": [spec.channels, spec.size, spec.size]}],
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        # TensorRT engines run on the GPU they were built for; ONNX where Triton finds one (GPU, else CPU)
        "instance_group": [{"count": instances, "kind": "KIND_GPU" if package.engine_format == "trt" else "KIND_AUTO"}],
        "default_model_filename": package.engine.rsplit("/", 1)[-1],  # the file in the version folder
    }


def to_pbtxt(config: Dict[str, Any]) -> str:
    """Protobuf text format of a model config dict (the subset of field kinds :func:`model_config` uses)."""
    return "".join(_field(key, value, 0) for key, value in config.items())


_ENUMS = ("data_type", "kind")


def _field(key: str, value: Any, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, dict):
        return f"{pad}{key} {{\n" + "".join(_field(k, v, depth + 1) for k, v in value.items()) + f"{pad}}}\n"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "".join(_field(key, item, depth) for item in value)
    if isinstance(value, list):
        return f"{pad}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]\n"
    return f"{pad}{key}: {_scalar(key, value)}\n"


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if key in _ENUMS:
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
