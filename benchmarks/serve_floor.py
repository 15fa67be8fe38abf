"""What Python itself costs: a minimal ASGI server for one model package, the floor `cskd serve` is read against.

uvicorn with uvloop and httptools, onnxruntime called inline on the event loop, and only what
perf_analyzer needs: readiness, v2 model metadata and configuration, and v2 inference with binary
tensors in and out (the same answer bytes' layout as `cskd serve`: ``logits`` and ``probabilities``).
No validation, no keys, no limits, no batching, no metrics: everything `cskd serve` keeps is what its
overhead over this buys. Takes the server flags `benchmarks/serve_perf_analyzer.sh` passes:

    SERVE="python3 benchmarks/serve_floor.py" bash benchmarks/serve_perf_analyzer.sh OUT PACKAGE
    python3 benchmarks/serve_floor.py runs/demo/export-onnx-int8 --port 8000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn

from cskd.runtime.package import read_package
from cskd.runtime.triton import PLATFORMS, model_config


def create_app(folder: Path):
    package = read_package(folder)
    session = ort.InferenceSession(str(folder / package.engine), providers=["CPUExecutionProvider"])
    spec, name = package.input, package.name
    dtype = np.uint8 if spec.dtype == "uint8" else np.float32
    shape = (spec.channels, spec.size, spec.size)
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    infer_path = f"/v2/models/{name}/infer"
    classes = len(package.classes)
    replies = {
        "/readyz": json.dumps({"ready": True}).encode(),
        "/v2": json.dumps({"name": "floor", "version": "0", "extensions": []}).encode(),  # perf_analyzer asks first
        "/v1/model": json.dumps({"name": name}).encode(),
        f"/v2/models/{name}": json.dumps({
            "name": name, "versions": ["1"], "platform": PLATFORMS[package.engine_format],
            "inputs": [{"name": spec.name, "datatype": "UINT8" if dtype is np.uint8 else "FP32", "shape": [-1, *shape]}],
            "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, classes]} for o in ("logits", "probabilities")]}).encode(),
        f"/v2/models/{name}/config": json.dumps(model_config(package, name, 8)).encode(),
    }

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        if path == infer_path:
            header_length = int(dict(scope["headers"]).get(b"inference-header-content-length", b"0"))
            blob = body[header_length:]
            rows = np.frombuffer(blob, dtype=dtype).reshape(len(blob) // row_bytes, *shape)
            logits = session.run(["logits"], {spec.name: rows})[0]
            exp = np.exp(logits - logits.max(1, keepdims=True))
            outputs = [("logits", logits), ("probabilities", exp / exp.sum(1, keepdims=True))]
            raws = [np.ascontiguousarray(a, dtype="<f4").tobytes() for _, a in outputs]
            header = json.dumps({"model_name": name, "model_version": "1", "outputs": [
                {"name": n, "datatype": "FP32", "shape": list(a.shape), "parameters": {"binary_data_size": len(r)}}
                for (n, a), r in zip(outputs, raws)]}, separators=(",", ":")).encode()
            reply, headers = header + b"".join(raws), [(b"content-type", b"application/octet-stream"),
                                                       (b"inference-header-content-length", str(len(header)).encode())]
        elif path in replies:
            reply, headers = replies[path], [(b"content-type", b"application/json")]
        else:
            reply, headers = b'{"error":"not found"}', [(b"content-type", b"application/json")]
        status = 200 if path == infer_path or path in replies else 404
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=0, help="ignored: the floor speaks HTTP only")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    uvicorn.run(create_app(args.package), host=args.host, port=args.port, loop="uvloop", http="httptools",
                log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
