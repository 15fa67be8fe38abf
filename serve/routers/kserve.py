"""The KServe v2 Open Inference Protocol, so standard v2 clients (``tritonclient``) work unchanged.

Tensors go in as the engine expects them (``[N, C, H, W]``, FP32 normalised or UINT8 raw pixels,
as ``model.json`` says), in JSON or with the binary tensor extension, and come out as ``logits``
and ``probabilities``, in JSON or binary as asked. Errors are ``{"error": message}`` (with a
``code``). Triton's model-configuration extension (``/config``) answers the same configuration
``cskd export --format triton`` writes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cskd.serve import v2_model
from cskd.serve.security import require_api_key
from cskd.serve.state import ServedModel, Serving, get_serving, serving_for
from cskd.serve.v2_model import bad_request
from cskd.serve.v2_protocol import HEADER, InferenceRequest, ProtocolError, encode_response, inline_schema, parse_request

router = APIRouter(prefix="/v2", tags=["kserve-v2"])  # health: never behind the key
server = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])
models = APIRouter(prefix="/v2/models", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])

_MODEL_ERRORS = {404: {"description": "unknown model or version"}, 503: {"description": "not ready"}}


@server.get("", summary="v2 server metadata")
async def server_metadata() -> dict:
    return v2_model.server_metadata()


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    return JSONResponse({"ready": serving.serviceable}, status_code=200 if serving.serviceable else 503)


@server.post("/repository/index", summary="Triton's model repository index: every served model and its state")
async def repository_index(serving: Annotated[Serving, Depends(get_serving)]) -> list:
    return v2_model.repository_index(serving)


async def served_model(request: Request, serving: Annotated[Serving, Depends(get_serving)]) -> ServedModel:
    """Dependency: the model the path names (and its version, if any), else 404."""
    return v2_model.served_model(serving, request.path_params.get("name"), request.path_params.get("version"))


Model = Annotated[ServedModel, Depends(served_model)]


@models.get("/{name}", summary="v2 model metadata", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}", summary="v2 model metadata (one version)", responses=_MODEL_ERRORS)
async def metadata(model: Model) -> dict:
    return v2_model.model_metadata(model)


@models.get("/{name}/ready", summary="v2 model readiness", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}/ready", summary="v2 model readiness (one version)", responses=_MODEL_ERRORS)
async def model_ready(model: Model) -> JSONResponse:
    # the status tells (tritonclient's is_model_ready reads nothing else): not ready is 503, as for the server
    return JSONResponse({"name": model.name, "ready": model.serviceable}, status_code=200 if model.serviceable else 503)


@models.get("/{name}/config", summary="Triton model configuration", responses=_MODEL_ERRORS)
@models.get("/{name}/versions/{version}/config", summary="Triton model configuration (one version)", responses=_MODEL_ERRORS)
async def config(model: Model) -> dict:
    return v2_model.triton_config(model)


_INFER_BODY = {"requestBody": {"required": True, "description": "v2 inference request JSON; with the binary tensor extension "
               "the raw tensors follow it and Inference-Header-Content-Length gives the JSON's length",
               "content": {"application/json": {"schema": inline_schema(InferenceRequest)},
                           "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@models.post("/{name}/infer", summary="v2 inference", openapi_extra=_INFER_BODY,
             responses={**_MODEL_ERRORS, 400: {"description": "invalid request"}, 413: {"description": "too many images"}})
@models.post("/{name}/versions/{version}/infer", summary="v2 inference (one version)", openapi_extra=_INFER_BODY,
             responses={**_MODEL_ERRORS, 400: {"description": "invalid request"}, 413: {"description": "too many images"}})
async def infer(request: Request) -> Response:
    """Answered by ``InferenceLane`` (see ``app.py``): it reads its own key, state and path."""
    model = v2_model.served_model(serving_for(request), request.path_params["name"], request.path_params.get("version"))
    body = await request.body()
    try:
        if len(body) > 64 * 1024:  # big JSON tensors take a while to parse: not on the event loop
            parsed = await run_in_threadpool(parse_request, body, request.headers.get(HEADER))
        else:
            parsed = parse_request(body, request.headers.get(HEADER))
    except ProtocolError as exc:
        raise bad_request(str(exc)) from None
    rows = v2_model.input_rows(model, parsed.inputs)
    outputs = v2_model.wanted_outputs([name for name, _ in parsed.outputs or []])
    computed = await v2_model.infer(model, rows, outputs)
    body, headers, media_type = encode_response(model.name, model.package.version, parsed, computed)
    return Response(body, media_type=media_type, headers=headers)
