"""Optional API key: ``Authorization: Bearer KEY`` on every route but the health checks (HTTP), the
same header as ``authorization`` metadata on the model RPCs (gRPC)."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Request

from cskd.serve.errors import APIError


def check_api_key(key: Optional[str], authorization: str) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <key>`` (nothing to check when no key is set)."""
    if not key:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       {"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request) -> None:
    """Dependency of the routers behind the key."""
    check_api_key(request.app.state.serving.settings.api_key, request.headers.get("authorization", ""))
