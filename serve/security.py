"""Optional API key: ``Authorization: Bearer KEY`` on every route but the health checks."""

from __future__ import annotations

import hmac

from fastapi import Request

from cskd.serve.errors import APIError


async def require_api_key(request: Request) -> None:
    key = request.app.state.serving.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       {"WWW-Authenticate": "Bearer"})
