"""The KServe v2 Open Inference Protocol, so standard v2 clients (``tritonclient``) work unchanged.

Tensors go in as the engine expects them (``[N, C, H, W]``, FP32 normalised or UINT8 raw pixels,
as ``model.json`` says), in JSON or with the binary tensor extension, and come out as ``logits``
and ``probabilities``, in JSON or binary as asked. Errors are ``{"error": message}`` (with a
``code``). Triton's model-configuration extension (``/config``) answers the same configuration
``cskd export --format triton`` writes.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cskd import __version__
from cskd.runtime.postprocess import softmax
from cskd.runtime.triton import PLATFORMS, model_config
from cskd.serve.errors import APIError, too_large
from cskd.serve.security import require_api_key
from cskd.serve.state import Serving, get_serving
from cskd.serve.v2_protocol import HEADER, OF_NUMPY, ProtocolError, Tensor, encode_response, parse_request

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
models = APIRouter(prefix="/v2/models", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])

OUTPUTS = ("logits", "probabilities")
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
_MODEL_ERRORS = {404: {"description": "unknown model or version"}, 503: {"description": "not ready"}}


def bad_request(message: str, code: str = "invalid_request") -> APIError:
    return APIError(400, code, message)  # the protocol's status for a request it cannot serve


@router.get("", summary="v2 server metadata")
async def server_metadata() -> dict:
    return {"name": "cskd", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    return JSONResponse({"ready": serving.ready}, status_code=200 if serving.ready else 503)


def served_model(request: Request, serving: Annotated[Serving, Depends(get_serving)]) -> Serving:
    """Dependency: the serving state, once the path's model name (and version, if any) are this server's."""
    name, version = request.path_params.get("name"), request.path_params.get("version")
    if name != serving.model_name:
        raise APIError(404, "model_not_found", f"no model named {name!r}; this server serves {serving.model_name!r}")
    if version is not None and version != serving.package.version:
        raise APIError(404, "model_not_found", f"model {name!r} has no version {version!r}; it has {serving.package.version!r}")
    return serving


Model = Annotated[Serving, Depends(served_model)]


@models.get("/{name}", summary="v2 model metadata", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}", summary="v2 model metadata (one version)", responses=_MODEL_ERRORS)
async def metadata(serving: Model) -> dict:
    spec, package = serving.package.input, serving.package
    return {
        "name": serving.model_name, "versions": [package.version], "platform": PLATFORMS[package.engine_format],
        "inputs": [{"name": spec.name, "datatype": OF_NUMPY[spec.dtype], "shape": [-1, spec.channels, spec.size, spec.size]}],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, len(package.classes)]} for out in OUTPUTS],
    }


@models.get("/{name}/ready", summary="v2 model readiness", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}/ready", summary="v2 model readiness (one version)", responses=_MODEL_ERRORS)
async def model_ready(serving: Model) -> dict:
    return {"name": serving.model_name, "ready": serving.ready}


@models.get("/{name}/config", summary="Triton model configuration", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}/config", summary="Triton model configuration (one version)", responses=_MODEL_ERRORS)
async def config(serving: Model) -> dict:
    return model_config(serving.package, serving.model_name, serving.max_batch, int(serving.settings.max_wait_ms * 1000))


_INFER_BODY = {"requestBody": {"required": True, "description": "v2 inference request JSON; with the binary tensor extension "
               "the raw tensors follow it and Inference-Header-Content-Length gives the JSON's length",
               "content": {"application/json": {"schema": {"type": "object"}},
                           "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@models.post("/{name}/infer", summary="v2 inference", openapi_extra=_INFER_BODY,
             responses={**_MODEL_ERRORS, 400: {"description": "invalid request"}, 413: {"description": "too many images"}})
@models.post("/{name}/versions/{version}/infer", summary="v2 inference (one version)", openapi_extra=_INFER_BODY,
             responses={**_MODEL_ERRORS, 400: {"description": "invalid request"}, 413: {"description": "too many images"}})
async def infer(request: Request, serving: Model) -> Response:
    body = await request.body()
    try:
        if len(body) > 64 * 1024:  # big JSON tensors take a while to parse: not on the event loop
            parsed = await run_in_threadpool(parse_request, body, request.headers.get(HEADER))
        else:
            parsed = parse_request(body, request.headers.get(HEADER))
    except ProtocolError as exc:
        raise bad_request(str(exc)) from None
    rows = _input_rows(parsed.inputs, serving)
    unknown = [name for name, _ in parsed.outputs or [] if name not in OUTPUTS]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r}; this model gives {' and '.join(OUTPUTS)}", "invalid_tensor")
    logits = np.asarray(await serving.infer(rows), dtype=np.float32)
    computed = {"logits": logits, "probabilities": softmax(logits).astype(np.float32)}
    wanted = [name for name, _ in parsed.outputs] if parsed.outputs else list(OUTPUTS)
    body, headers, media_type = encode_response(serving.model_name, serving.package.version, parsed,
                                                [(name, computed[name]) for name in wanted])
    return Response(body, media_type=media_type, headers=headers)


def _input_rows(inputs: list[Tensor], serving: Serving) -> np.ndarray:
    """The one input tensor, checked against the model's name, datatype and shape."""
    spec = serving.package.input
    expected = OF_NUMPY[spec.dtype]
    if len(inputs) != 1 or inputs[0].name != spec.name:
        raise bad_request(f"send one input named {spec.name!r}; got {[t.name for t in inputs]}", "invalid_tensor")
    tensor = inputs[0]
    if tensor.datatype != expected:
        raise bad_request(f"input datatype {tensor.datatype} is not the model's {expected}", "invalid_tensor")
    if len(tensor.shape) != 4 or tensor.shape[1:] != [spec.channels, spec.size, spec.size] or tensor.shape[0] < 1:
        raise bad_request(f"input shape {tensor.shape} is not [N, {spec.channels}, {spec.size}, {spec.size}]", "invalid_tensor")
    if tensor.shape[0] > serving.settings.max_images:
        raise too_large(f"{tensor.shape[0]} images in one request; the limit is {serving.settings.max_images}")
    return np.ascontiguousarray(tensor.array, dtype=np.dtype(spec.dtype))
