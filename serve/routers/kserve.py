"""The KServe v2 Open Inference Protocol, so standard v2 clients work.

Tensors go in as the engine expects them (``[N, C, H, W]``, FP32 normalised or UINT8 raw
pixels, as ``model.json`` says) and come out as ``logits`` (and ``probabilities`` on request).
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cskd.runtime.postprocess import softmax
from cskd.serve.errors import APIError, invalid, too_large
from cskd.serve.security import require_api_key
from cskd.serve.state import Serving, get_serving

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
models = APIRouter(prefix="/v2/models", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])

_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
_NUMPY = {"FP32": np.float32, "UINT8": np.uint8}


class InferTensor(BaseModel):
    name: str
    shape: List[int]
    datatype: str
    data: List[Any]
    parameters: Optional[dict] = None


class RequestedOutput(BaseModel):
    name: str
    parameters: Optional[dict] = None


class InferRequest(BaseModel):
    id: Optional[str] = None
    inputs: List[InferTensor] = Field(min_length=1, max_length=1)
    outputs: Optional[List[RequestedOutput]] = None
    parameters: Optional[dict] = None


class OutputTensor(BaseModel):
    name: str
    shape: List[int]
    datatype: str
    data: List[float]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    outputs: List[OutputTensor]


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    return JSONResponse({"ready": serving.ready}, status_code=200 if serving.ready else 503)


def _check_name(name: str, serving: Serving) -> None:
    if name != serving.model_name:
        raise APIError(404, "model_not_found", f"no model named {name!r}; this server serves {serving.model_name!r}")


@models.get("/{name}", summary="v2 model metadata", responses={404: {"description": "unknown model"}})
async def metadata(name: str, serving: Serving = Depends(get_serving)) -> dict:
    _check_name(name, serving)
    spec = serving.package.input
    return {
        "name": serving.model_name, "versions": [serving.package.version],
        "platform": f"{serving.backend_name}_{serving.package.engine_format}",
        "inputs": [{"name": spec.name, "datatype": _DATATYPES[spec.dtype], "shape": [-1, spec.channels, spec.size, spec.size]}],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, len(serving.package.classes)]} for out in ("logits", "probabilities")],
    }


@models.get("/{name}/ready", summary="v2 model readiness", responses={404: {"description": "unknown model"}})
async def model_ready(name: str, serving: Serving = Depends(get_serving)) -> dict:
    _check_name(name, serving)
    return {"name": name, "ready": serving.ready}


@models.post("/{name}/infer", response_model=InferResponse, summary="v2 inference",
             responses={404: {"description": "unknown model"}, 413: {"description": "too many images"},
                        422: {"description": "wrong tensor"}, 503: {"description": "overloaded"}})
async def infer(name: str, body: InferRequest, serving: Serving = Depends(get_serving)) -> InferResponse:
    _check_name(name, serving)
    spec, tensor = serving.package.input, body.inputs[0]
    expected_type = _DATATYPES[spec.dtype]
    if tensor.name != spec.name:
        raise invalid(f"input is named {tensor.name!r}; this model's input is {spec.name!r}", "invalid_tensor")
    if tensor.datatype != expected_type:
        raise invalid(f"input datatype {tensor.datatype} is not the model's {expected_type}", "invalid_tensor")
    if len(tensor.shape) != 4 or tensor.shape[1:] != [spec.channels, spec.size, spec.size] or tensor.shape[0] < 1:
        raise invalid(f"input shape {tensor.shape} is not [N, {spec.channels}, {spec.size}, {spec.size}]", "invalid_tensor")
    if tensor.shape[0] > serving.settings.max_images:
        raise too_large(f"{tensor.shape[0]} images in one request; the limit is {serving.settings.max_images}")
    try:
        array = np.asarray(tensor.data, dtype=np.float64).reshape(tensor.shape)
    except (ValueError, TypeError):
        raise invalid(f"input data does not hold {int(np.prod(tensor.shape))} numbers of shape {tensor.shape}", "invalid_tensor") from None
    if not np.isfinite(array).all() or (expected_type == "UINT8" and ((array < 0).any() or (array > 255).any() or (array % 1).any())):
        raise invalid(f"input data holds values that are not valid {expected_type}", "invalid_tensor")
    logits = np.asarray(await serving.infer(array.astype(_NUMPY[expected_type])), dtype=np.float32)
    wanted = [o.name for o in body.outputs] if body.outputs else ["logits"]
    unknown = [w for w in wanted if w not in ("logits", "probabilities")]
    if unknown:
        raise invalid(f"unknown output {unknown[0]!r}; this model gives logits and probabilities", "invalid_tensor")
    tensors = {"logits": logits, "probabilities": softmax(logits).astype(np.float32)}
    return InferResponse(
        model_name=serving.model_name, model_version=serving.package.version, id=body.id,
        outputs=[OutputTensor(name=w, shape=list(tensors[w].shape), datatype="FP32", data=tensors[w].ravel().tolist()) for w in wanted],
    )
