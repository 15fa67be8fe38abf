"""Liveness and readiness (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="the model is loaded and warmed up", responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    body = {"ready": serving.ready, "model": serving.model_name}
    return JSONResponse(body, status_code=200 if serving.ready else 503)
