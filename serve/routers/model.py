"""``GET /v1/model``: the served package's model.json, and ``GET /metrics`` for Prometheus."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cskd.serve.security import require_api_key
from cskd.serve.state import Serving, get_serving

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/v1/model", summary="the model package's model.json")
async def model_info(serving: Annotated[Serving, Depends(get_serving)]) -> dict:
    return {**serving.package.to_dict(), "backend": serving.backend_name, "max_batch": serving.max_batch}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)
