"""Liveness and readiness (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="every model is loaded, warmed up and its backend answers",
            responses={503: {"description": "not ready: loading, or the backend is stuck on a call"}})
async def readyz(request: Request) -> JSONResponse:
    serving = request.app.state.serving
    body = {"ready": serving.serviceable, "models": {name: serving.ready and model.serviceable
                                                     for name, model in serving.models.items()}}
    stuck = [name for name, model in serving.models.items() if not model.serviceable]
    if serving.ready and stuck:
        body["reason"] = (f"the backend of {', '.join(stuck)} has not returned from a call for over "
                          f"{serving.settings.request_timeout_s:g} s")
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
