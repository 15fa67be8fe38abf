"""``GET /v1/shadow``: how the served student agrees with its shadow teacher on live traffic."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from cskd.serve.errors import APIError
from cskd.serve.security import require_api_key
from cskd.serve.state import Serving, get_serving

router = APIRouter(tags=["shadow"], dependencies=[Depends(require_api_key)])


@router.get("/v1/shadow", summary="agreement of the student with its shadow teacher: window, outcomes, confusion, capture",
            responses={404: {"description": "the server runs without a shadow teacher (--shadow)"}})
async def shadow_report(serving: Annotated[Serving, Depends(get_serving)]) -> dict:
    if serving.shadow is None:
        raise APIError(404, "no_shadow", "this server runs without a shadow teacher; start it with --shadow TEACHER_PACKAGE "
                       "(and --shadow-rate R)")
    return serving.shadow.report()
