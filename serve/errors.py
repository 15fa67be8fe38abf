"""Errors the API answers with: JSON with a stable ``code`` and a status code.

Routes under ``/v2`` follow the KServe v2 protocol, whose clients read ``{"error": message}``
(``tritonclient`` fails on anything else); the rest of the API answers ``{"code", "message"}``.
Both carry the code.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

V2_PREFIX = "/v2"


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def timed_out(message: str) -> APIError:
    return APIError(504, "timeout", message)


def bad_image(message: str) -> APIError:
    return APIError(400, "bad_image", message)


def too_large(message: str) -> APIError:
    return APIError(413, "too_large", message)


def invalid(message: str, code: str = "invalid_request") -> APIError:
    return APIError(422, code, message)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


def error_body(code: str, message: str, path: str = "") -> Dict[str, Any]:
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return {"error": message, "code": code}
    return {"code": code, "message": message}


def error_response(status: int, code: str, message: str, path: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, path), status_code=status, headers=headers)


def response_for(exc: Exception, path: str) -> JSONResponse:
    """The answer to an APIError, or to anything unexpected (a backend that fails, or a bug): still the
    contract's JSON (and v2's ``{"error"}``), never a plain-text page or a dropped connection."""
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.code, exc.message, path, exc.headers)
    return error_response(500, "internal_error", f"the server failed on this request ({type(exc).__name__}: {exc})", path)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return response_for(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, "invalid_request", f"{where or 'request'}: {first.get('msg', 'invalid')}", request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), request.url.path, getattr(exc, "headers", None))
