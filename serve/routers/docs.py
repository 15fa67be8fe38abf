"""``/openapi.json`` and ``/docs``: behind the API key, as every route but the health checks.

With a key set, the interactive page needs it too (a browser sends no ``Authorization`` header by
itself): fetch ``/openapi.json`` with the header, or explore the API on a server without a key.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from cskd.serve.security import require_api_key

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title)
