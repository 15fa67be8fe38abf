"""``GET /v1/model`` and ``/v1/models``: the served packages' model.json; ``GET /metrics`` for Prometheus."""

from __future__ import annotations

from typing import Annotated, List, Optional

from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cskd.serve.security import require_api_key
from cskd.serve.state import ServedModel, Serving, get_serving

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])


def describe(model: ServedModel) -> dict:
    return {**model.package.to_dict(), "name": model.name, "backend": model.backend_name, "max_batch": model.max_batch}


@router.get("/v1/model", summary="a served model's model.json (the first one's unless ?model= names another)",
            responses={404: {"description": "unknown model"}})
async def model_info(serving: Annotated[Serving, Depends(get_serving)],
                     model: Annotated[Optional[str], Query(description="a served model's name")] = None) -> dict:
    return describe(serving.model(model))


@router.get("/v1/models", summary="every served model's model.json, in the order /predict's default comes first")
async def models_info(serving: Annotated[Serving, Depends(get_serving)]) -> List[dict]:
    return [describe(model) for model in serving.models.values()]


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)
