"""``POST /predict``: image files -> top-k labels per image.

Three ways to send images: a raw body (``Content-Type: image/png``, ``image/jpeg``...: one image,
the cheapest), multipart form files (field ``files``, several allowed) or JSON base64. The answer
is serialised once, straight to bytes (the response model documents it; returning a ``Response``
skips FastAPI's second validation and encoding pass).
"""

from __future__ import annotations

import json
from typing import List, Optional

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from cskd import __version__
from cskd.runtime.postprocess import top_k as top_k_labels
from cskd.serve.errors import APIError, invalid, too_large
from cskd.serve.parsing import MalformedInput, load_json, parse_count
from cskd.serve.state import ServedModel, decode_base64, serving_for

router = APIRouter(tags=["predict"])  # the key is checked by serving_for


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
    "parameters": [{"name": "top_k", "in": "query", "required": False, "description": "labels per image (default 5)",
                    "schema": {"type": "integer", "minimum": 1}},
                   {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "the served model to answer (default: the first one the server was given)"}],
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


async def _read_images(request: Request, serving: ServedModel) -> tuple[List[bytes], Optional[int]]:
    content_type = request.headers.get("content-type", "").lower()
    limit = serving.settings.max_images
    if content_type.startswith("image/"):
        return [await request.body()], None
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limit + 1, max_part_size=serving.settings.max_body_bytes)
        except (APIError, ClientDisconnect):
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
            top_k = parse_count(raw_k)
            if top_k is None:
                raise invalid(f"top_k must be a positive integer, got {raw_k[:40]!r}")
        return [await f.read() for f in files], top_k
    if content_type.startswith("application/json"):
        try:
            body = PredictRequest.model_validate(load_json(await request.body()))
        except MalformedInput as exc:
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
async def predict(request: Request) -> Response:
    """Answered by ``InferenceLane`` (see ``app.py``): it reads its own query, key and state."""
    serving = serving_for(request).model(request.query_params.get("model"))
    raw_k = request.query_params.get("top_k")
    query_k = None if raw_k is None else parse_count(raw_k)
    if raw_k is not None and query_k is None:
        raise invalid(f"top_k must be a positive integer, got {raw_k[:40]!r}")
    images, body_k = await _read_images(request, serving)
    k = next((value for value in (query_k, body_k) if value is not None), 5)
    if not 1 <= k <= serving.settings.max_top_k:
        raise invalid(f"top_k must be between 1 and {serving.settings.max_top_k}, got {k}")
    logits = await serving.classify(images)
    if not np.isfinite(logits).all():  # decoded images are in range: only a broken engine gets here
        raise APIError(500, "non_finite_output", "the model's logits for these images are not finite; the engine is "
                       "broken (re-export the package, and check its parity figures in /v1/model)")
    results = top_k_labels(np.asarray(logits), k, serving.package.classes)
    body = {"model": serving.name, "version": __version__, "predictions": [{"top": top} for top in results]}
    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), media_type="application/json")
