"""``POST /predict``: image files -> top-k labels per image.

Three ways to send images: a raw body (``Content-Type: image/png``, ``image/jpeg``...: one image,
the cheapest), multipart form files (field ``files``, several allowed) or JSON base64. The answer
is serialised once, straight to bytes (the response model documents it; returning a ``Response``
skips FastAPI's second validation and encoding pass).
"""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from cskd import __version__
from cskd.runtime.postprocess import top_k as top_k_labels
from cskd.serve.errors import APIError, invalid, too_large
from cskd.serve.security import require_api_key
from cskd.serve.state import Serving, decode_base64, get_serving

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class ImageResult(BaseModel):
    top: List[Prediction]


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: List[ImageResult]


class PredictRequest(BaseModel):
    images: List[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG...)")
    top_k: Optional[int] = Field(None, ge=1, description="labels per image (default 5)")


_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "top_k": {"type": "integer", "minimum": 1}}, "required": ["files"]}},
            "application/json": {"schema": PredictRequest.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {code: {"description": text} for code, text in {
    400: "an image cannot be decoded", 401: "missing or wrong API key", 413: "body or image count too large",
    415: "unsupported content type", 422: "invalid request", 503: "overloaded or not ready"}.items()}


async def _read_images(request: Request, serving: Serving) -> tuple[List[bytes], Optional[int]]:
    content_type = request.headers.get("content-type", "").lower()
    limit = serving.settings.max_images
    if content_type.startswith("image/"):
        return [await request.body()], None
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limit + 1, max_part_size=serving.settings.max_body_bytes)
        except APIError:
            raise
        except Exception as exc:  # malformed multipart, too many parts
            detail = str(getattr(exc, "detail", exc))
            if "Too many files" in detail:
                raise too_large(f"more than {limit} images in one request; the limit is {limit}") from None
            raise invalid(f"cannot parse the multipart body: {detail}") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if len(files) > limit:
            raise too_large(f"{len(files)} images in one request; the limit is {limit}")
        if not files:
            raise invalid("no image files in the multipart body; send them as form files (field 'files')")
        raw_k = form.get("top_k")
        top_k = None
        if isinstance(raw_k, str):
            text = raw_k.strip()
            if not (text.isascii() and text.isdigit()):
                raise invalid(f"top_k must be a positive integer, got {raw_k!r}")
            top_k = int(text)
        return [await f.read() for f in files], top_k
    if content_type.startswith("application/json"):
        try:
            body = PredictRequest.model_validate(json.loads(await request.body()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise invalid(f"body is not valid JSON: {exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            raise invalid(f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
        if len(body.images) > limit:
            raise too_large(f"{len(body.images)} images in one request; the limit is {limit}")
        return [decode_base64(text, i) for i, text in enumerate(body.images)], body.top_k
    raise APIError(415, "unsupported_media_type",
                   f"content type {content_type or 'none'!r} is not supported; send an image/* body, multipart/form-data "
                   "files or application/json")


@router.post("/predict", response_model=PredictResponse, summary="classify images", openapi_extra=_REQUEST_BODY,
             responses=_ERRORS)
async def predict(request: Request, serving: Annotated[Serving, Depends(get_serving)],
                  top_k: Annotated[Optional[int], Query(ge=1, description="labels per image (default 5)")] = None) -> Response:
    images, body_k = await _read_images(request, serving)
    k = next((value for value in (top_k, body_k) if value is not None), 5)
    if not 1 <= k <= serving.settings.max_top_k:
        raise invalid(f"top_k must be between 1 and {serving.settings.max_top_k}, got {k}")
    logits = await serving.classify(images)
    results = top_k_labels(np.asarray(logits), k, serving.package.classes)
    body = {"model": serving.model_name, "version": __version__, "predictions": [{"top": top} for top in results]}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")
