"""Liveness and readiness (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="the model is loaded, warmed up and its backend answers",
            responses={503: {"description": "not ready: loading, or the backend is stuck on a call"}})
async def readyz(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    body = {"ready": serving.serviceable, "model": serving.model_name}
    if serving.ready and not serving.serviceable:
        body["reason"] = f"the backend has not returned from a call for over {serving.batcher.stall_after_s:g} s"
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
