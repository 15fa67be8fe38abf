"""The KServe v2 Open Inference Protocol's operations on the served models, whatever the transport.

HTTP (``routers/kserve.py``) and gRPC (``grpc_service.py``) both answer from here, so metadata,
input checks, limits and outputs are the same on either: a transport only decodes the request and
encodes the answer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cskd import __version__
from cskd.runtime.postprocess import softmax
from cskd.runtime.triton import PLATFORMS, model_config
from cskd.serve.errors import APIError, too_large
from cskd.serve.state import ServedModel, Serving
from cskd.serve.v2_protocol import OF_NUMPY, Tensor

OUTPUTS = ("logits", "probabilities")
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def bad_request(message: str, code: str = "invalid_request") -> APIError:
    return APIError(400, code, message)  # the protocol's status for a request it cannot serve


def server_metadata() -> Dict[str, Any]:
    return {"name": "cskd", "version": __version__, "extensions": EXTENSIONS}


def served_model(serving: Serving, name: str, version: Optional[str]) -> ServedModel:
    """The model the request names (and its version, if given), else 404."""
    model = serving.model(name)
    if version and version != model.package.version:
        raise APIError(404, "model_not_found", f"model {name!r} has no version {version!r}; it has {model.package.version!r}")
    return model


def repository_index(serving: Serving) -> List[Dict[str, Any]]:
    """Triton's model repository index: every served model, its version and state."""
    return [{"name": model.name, "version": model.package.version, "state": "READY" if model.serviceable else "UNAVAILABLE",
             "reason": "" if model.serviceable else "its backend is stuck on a call"} for model in serving.models.values()]


def model_metadata(model: ServedModel) -> Dict[str, Any]:
    spec, package = model.package.input, model.package
    return {
        "name": model.name, "versions": [package.version], "platform": PLATFORMS[package.engine_format],
        "inputs": [{"name": spec.name, "datatype": OF_NUMPY[spec.dtype], "shape": [-1, spec.channels, spec.size, spec.size]}],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, len(package.classes)]} for out in OUTPUTS],
    }


def triton_config(model: ServedModel) -> Dict[str, Any]:
    """Triton's model configuration, as ``cskd export --format triton`` writes it."""
    return model_config(model.package, model.name, model.max_batch, int(model.settings.max_wait_ms * 1000))


def input_rows(model: ServedModel, inputs: Sequence[Tensor]) -> np.ndarray:
    """The one input tensor, checked against the model's name, datatype, shape and the image limit."""
    spec = model.package.input
    expected = OF_NUMPY[spec.dtype]
    if len(inputs) != 1 or inputs[0].name != spec.name:
        raise bad_request(f"send one input named {spec.name!r}; got {[t.name for t in inputs]}", "invalid_tensor")
    tensor = inputs[0]
    if tensor.datatype != expected:
        raise bad_request(f"input datatype {tensor.datatype} is not the model's {expected}", "invalid_tensor")
    if len(tensor.shape) != 4 or list(tensor.shape[1:]) != [spec.channels, spec.size, spec.size] or tensor.shape[0] < 1:
        raise bad_request(f"input shape {tensor.shape} is not [N, {spec.channels}, {spec.size}, {spec.size}]", "invalid_tensor")
    if tensor.shape[0] > model.settings.max_images:
        raise too_large(f"{tensor.shape[0]} images in one request; the limit is {model.settings.max_images}")
    return np.ascontiguousarray(tensor.array, dtype=np.dtype(spec.dtype))


def wanted_outputs(requested: Optional[Sequence[str]]) -> List[str]:
    """The outputs asked for (all when none are named); an unknown name is a 400."""
    if not requested:
        return list(OUTPUTS)
    unknown = [name for name in requested if name not in OUTPUTS]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r}; this model gives {' and '.join(OUTPUTS)}", "invalid_tensor")
    return list(requested)


def input_range(spec) -> Tuple[float, float]:
    """The values an image takes once encoded as the engine's input: [0, 255] raw pixels, or pixels in
    [0, 1] normalised by the package's mean and std."""
    if spec.dtype == "uint8":
        return 0.0, 255.0
    ends = [((0.0 - m) / s, (1.0 - m) / s) for m, s in zip(spec.mean, spec.std)]
    return min(lo for lo, _ in ends), max(hi for _, hi in ends)


async def infer(model: ServedModel, rows: np.ndarray, outputs: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    """Run ``rows`` through the batcher; ``(name, float32 array)`` for each output asked for. Logits
    that are not finite (an input far outside the images' range overflows the engine) are a 400 naming
    that range: v2 answers are strict JSON, which has no NaN."""
    logits = np.asarray(await model.infer(rows), dtype=np.float32)
    if not np.isfinite(logits).all():
        low, high = input_range(model.package.input)
        raise bad_request(f"the model's outputs for this input are not finite: its values span [{float(rows.min()):.4g}, "
                          f"{float(rows.max()):.4g}], while images encoded as the model's input spec says lie within "
                          f"[{low:.4g}, {high:.4g}] (GET /v2/models/{model.name} and /v1/model give the spec)",
                          "non_finite_output")
    return [(name, logits if name == "logits" else softmax(logits).astype(np.float32)) for name in outputs]
