"""The KServe v2 Open Inference Protocol's tensor encodings: JSON and the binary tensor extension.

A request body is a JSON header, followed, when any tensor is sent in binary, by the raw bytes of
those tensors in order; ``Inference-Header-Content-Length`` gives the JSON's length. Clients send
it without a JSON content type (``tritonclient`` sends none), so the body is parsed here, not by
FastAPI. Responses put each output in JSON ``data`` or, when asked (the output's ``binary_data``
parameter, else the request's ``binary_data_output``), as little-endian bytes after the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, WithJsonSchema

from cskd.serve.parsing import MalformedInput, load_json, parse_count

# v2 datatype <-> numpy (little-endian, as the binary extension specifies)
DATATYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
             "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
OF_NUMPY = {"float32": "FP32", "uint8": "UINT8", "float16": "FP16"}
HEADER = "inference-header-content-length"
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A request that does not follow the protocol (answered 400 with ``{"error": ...}``)."""


# The inference request's JSON, typed as the protocol says: every field's type is checked once, here,
# and the OpenAPI schema built from these models tells fuzzers (schemathesis) what a wrong type is.
# An enum without "type": "string", so that a fuzzer's wrong values for it are of every type, not strings only.
Datatype = Annotated[Literal[tuple(DATATYPES)], WithJsonSchema({"enum": list(DATATYPES)})]  # type: ignore[valid-type]
Dimension = Annotated[StrictInt, Field(ge=0)]


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: Optional[Annotated[StrictInt, Field(ge=0)]] = None


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data: Optional[StrictBool] = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_output: Optional[StrictBool] = None


class RequestInput(BaseModel):
    """``$request_input``: a tensor's name, datatype and shape, with its values in ``data`` (row-major,
    flat or nested) or, with the binary tensor extension, ``binary_data_size`` bytes after the JSON."""
    name: StrictStr
    datatype: Datatype
    shape: List[Dimension] = Field(max_length=MAX_DIMS)
    parameters: Optional[TensorParameters] = None
    data: Optional[List[Any]] = None  # row-major values, flat or nested


class RequestOutput(BaseModel):
    name: StrictStr
    parameters: Optional[OutputParameters] = None


class InferenceRequest(BaseModel):
    """``$inference_request`` of the KServe v2 protocol."""
    id: Optional[StrictStr] = None
    parameters: Optional[RequestParameters] = None
    inputs: List[RequestInput] = Field(min_length=1)
    outputs: Optional[List[RequestOutput]] = None


def inline_schema(model: type[BaseModel]) -> Dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place: an OpenAPI document resolves
    ``$ref`` from its own root, where pydantic's local definitions are not."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "the request"
    got = repr(first.get("input"))[:60]
    return f"{where}: {first['msg']} (got {got})"


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: List[int]
    array: np.ndarray


@dataclass
class InferRequest:
    inputs: List[Tensor]
    outputs: Optional[List[Tuple[str, Optional[bool]]]]  # requested (name, binary or None), or None for all
    binary_output: bool = False  # request parameter binary_data_output: the default for outputs
    id: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        requested = dict(self.outputs or [])
        binary = requested.get(name)
        return self.binary_output if binary is None else binary


def parse_request(body: bytes, header_length: Optional[str]) -> InferRequest:
    """Split and decode a v2 inference request body; every inconsistency is a :class:`ProtocolError`."""
    json_length = len(body)
    if header_length is not None:
        length = parse_count(header_length)
        if length is None or length > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length[:40]!r} is not a length within the "
                                f"{len(body)}-byte body")
        json_length = length
    try:
        header = InferenceRequest.model_validate(load_json(body[:json_length]))
    except MalformedInput as exc:
        raise ProtocolError(f"the request header is not valid JSON ({exc}); send the v2 inference request JSON, followed by "
                            "binary tensors only with Inference-Header-Content-Length") from None
    except ValidationError as exc:
        raise ProtocolError(f"not a v2 inference request: {_first_error(exc)}") from None
    blob, offset = memoryview(body)[json_length:], 0
    inputs = []
    for i, raw in enumerate(header.inputs):
        tensor, used = _input_tensor(raw, i, blob[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(blob):
        raise ProtocolError(f"{len(blob) - offset} bytes after the tensors belong to no input (binary_data_size too small?)")
    outputs = None if header.outputs is None else [
        (output.name, output.parameters.binary_data if output.parameters else None) for output in header.outputs]
    parameters = header.parameters.model_dump(exclude_none=True) if header.parameters else {}
    return InferRequest(inputs, outputs, parameters.get("binary_data_output") is True, header.id, parameters)


def _input_tensor(raw: RequestInput, index: int, blob: memoryview) -> Tuple[Tensor, int]:
    """A validated input entry -> its tensor, and how many bytes of ``blob`` (the binary part) it used."""
    name, datatype, shape = raw.name, raw.datatype, raw.shape
    size = raw.parameters.binary_data_size if raw.parameters else None
    if size is not None:  # tensor_from_bytes checks that the size holds the shape
        if size > len(blob):
            raise ProtocolError(f"inputs[{index}] ({name}): binary_data_size {size} is more than the "
                                f"{len(blob)} bytes sent after the header")
        return tensor_from_bytes(name, datatype, shape, blob[:size], index), size
    if raw.data is None:
        raise ProtocolError(f"inputs[{index}] ({name}) has neither 'data' nor a binary_data_size parameter")
    return tensor_from_values(name, datatype, shape, raw.data, index), 0


def check_tensor_header(name: Any, datatype: Any, shape: Any, index: int) -> None:
    """A tensor's name, datatype and shape are of the protocol's form (whatever the transport)."""
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise ProtocolError(f"inputs[{index}] needs a 'name' and a 'datatype' among {', '.join(DATATYPES)}; got {datatype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"inputs[{index}] ({name}) has shape {str(shape)[:80]}; a shape is a list of at most {MAX_DIMS} "
                            "non-negative integers")


def tensor_from_bytes(name: str, datatype: str, shape: List[int], raw: bytes | memoryview, index: int) -> Tensor:
    """A tensor from its little-endian bytes (the binary extension over HTTP, ``raw_input_contents`` over gRPC)."""
    dtype, count = np.dtype(DATATYPES[datatype]), math.prod(shape)  # Python ints: no overflow
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"inputs[{index}] ({name}): {len(raw)} bytes do not hold {shape} {datatype} "
                            f"({count * dtype.itemsize} bytes)")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    _check_finite(array, index, name)
    return Tensor(name, datatype, shape, array)


def tensor_from_values(name: str, datatype: str, shape: List[int], values: Any, index: int) -> Tensor:
    """A tensor from a flat list of numbers (JSON ``data``, or gRPC's typed ``contents``), exact for integer types."""
    dtype, count = np.dtype(DATATYPES[datatype]), math.prod(shape)
    try:
        array = np.asarray(values, dtype=np.float64 if datatype.startswith("FP") else None)
        if array.size != count or not np.isfinite(array.astype(np.float64)).all():
            raise ValueError
        with np.errstate(over="ignore", invalid="ignore"):
            converted = array.astype(dtype).reshape(shape)
        if not datatype.startswith("FP") and not np.array_equal(converted.astype(np.float64).ravel(), array.astype(np.float64).ravel()):
            raise ValueError  # e.g. 300 or 1.5 sent as UINT8
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"inputs[{index}] ({name}): 'data' does not hold {count} finite {datatype} values for shape {shape}") from None
    _check_finite(converted, index, name)
    return Tensor(name, datatype, shape, converted)


def _check_finite(array: np.ndarray, index: int, name: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():  # also values beyond float32's range
        raise ProtocolError(f"inputs[{index}] ({name}) holds NaN or infinite values")


def encode_response(model_name: str, model_version: str, request: InferRequest,
                    outputs: List[Tuple[str, np.ndarray]]) -> Tuple[bytes, Dict[str, str], str]:
    """``(body, headers, media type)`` of an inference response carrying ``outputs`` (name, array)."""
    tensors, blobs = [], []
    for name, array in outputs:
        entry: Dict[str, Any] = {"name": name, "datatype": OF_NUMPY[array.dtype.name], "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        tensors.append(entry)
    response: Dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()  # strict JSON: callers check finiteness
    if not blobs:
        return header, {}, "application/json"
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"
