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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from cskd.serve.parsing import MalformedInput, load_json, parse_count

# v2 datatype <-> numpy (little-endian, as the binary extension specifies)
DATATYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
             "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
OF_NUMPY = {"float32": "FP32", "uint8": "UINT8", "float16": "FP16"}
HEADER = "inference-header-content-length"
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A request that does not follow the protocol (answered 400 with ``{"error": ...}``)."""


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
        header = load_json(body[:json_length])
    except MalformedInput as exc:
        raise ProtocolError(f"the request header is not valid JSON ({exc}); send the v2 inference request JSON, followed by "
                            "binary tensors only with Inference-Header-Content-Length") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("the request needs an 'inputs' list with at least one tensor")
    blob, offset = memoryview(body)[json_length:], 0
    inputs = []
    for i, raw in enumerate(header["inputs"]):
        tensor, used = _input_tensor(raw, i, blob[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(blob):
        raise ProtocolError(f"{len(blob) - offset} bytes after the tensors belong to no input (binary_data_size too small?)")
    parameters = _parameters(header, "the request")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {request_id!r}")
    return InferRequest(inputs, _requested_outputs(header.get("outputs")), parameters.get("binary_data_output") is True,
                        request_id, parameters)


def _parameters(entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"'parameters' of {where} must be an object, got {type(parameters).__name__}")
    return parameters


def _input_tensor(raw: Any, index: int, blob: memoryview) -> Tuple[Tensor, int]:
    """A JSON input entry -> its tensor, and how many bytes of ``blob`` (the binary part) it used."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"inputs[{index}] is not an object")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    check_tensor_header(name, datatype, shape, index)
    size = _parameters(raw, f"inputs[{index}]").get("binary_data_size")
    if size is not None:  # tensor_from_bytes checks that the size holds the shape
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(blob):
            raise ProtocolError(f"inputs[{index}] ({name}): binary_data_size {str(size)[:40]} is not a size within the "
                                f"{len(blob)} bytes sent after the header")
        return tensor_from_bytes(name, datatype, shape, blob[:size], index), size
    if "data" not in raw:
        raise ProtocolError(f"inputs[{index}] ({name}) has neither 'data' nor a binary_data_size parameter")
    return tensor_from_values(name, datatype, shape, raw["data"], index), 0


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
        if not np.array_equal(converted.astype(np.float64).ravel(), array.astype(np.float64).ravel()) and not datatype.startswith("FP"):
            raise ValueError  # e.g. 300 or 1.5 sent as UINT8
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"inputs[{index}] ({name}): 'data' does not hold {count} finite {datatype} values for shape {shape}") from None
    _check_finite(converted, index, name)
    return Tensor(name, datatype, shape, converted)


def _check_finite(array: np.ndarray, index: int, name: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():  # also values beyond float32's range
        raise ProtocolError(f"inputs[{index}] ({name}) holds NaN or infinite values")


def _requested_outputs(raw: Any) -> Optional[List[Tuple[str, Optional[bool]]]]:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    requested = []
    for i, output in enumerate(raw):
        binary = _parameters(output, f"outputs[{i}]").get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"outputs[{i}]: binary_data must be true or false, got {binary!r}")
        requested.append((output["name"], binary))
    return requested


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
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {}, "application/json"
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"
