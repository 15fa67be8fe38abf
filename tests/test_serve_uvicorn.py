"""A real `cskd serve` process on loopback: answers, NVIDIA's KServe v2 clients (HTTP and gRPC), load, and a
schemathesis run with no 5xx."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.loadtest import run_load
from cskd.measure.served import free_port
from cskd.runtime.package import read_package
from cskd.runtime.predict import predict_files
from cskd.runtime.preprocess import decode_image, to_engine_input
from tests.test_serve_app import metric_series, png_bytes, val_png_files

API_KEY = "test-key"


def wait_ready(base: str, proc: subprocess.Popen, log, timeout_s: float = 90.0) -> None:
    """Until the real server at ``base`` answers /readyz; its log in the error when it exits or never does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"cskd serve exited: {log.read_text()}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"cskd serve did not become ready in {timeout_s:.0f} s: {log.read_text()}")


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    package = tmp_path_factory.mktemp("uvicorn") / "pkg"
    export_model(trained_run, ExportOptions(out=package, parity_images=100), log=lambda _: None)
    port, grpc_port = free_port(), free_port()
    log = package.parent / "server.log"  # what the server printed: the hostile-client test reads it
    proc = subprocess.Popen([sys.executable, "-m", "cskd", "serve", str(package), "--port", str(port), "--grpc-port", str(grpc_port),
                             "--max-wait-ms", "5", "--api-key", API_KEY, "--log-level", "warning"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, log)
    yield base, package, f"127.0.0.1:{grpc_port}"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_real_server_answers_like_cskd_predict(server, tmp_path):
    base, package, _ = server
    paths = val_png_files(tmp_path, 5)
    response = httpx.post(base + "/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths],
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200
    expected = predict_files(package, paths, k=5)
    assert [[t["label"] for t in r["top"]] for r in response.json()["predictions"]] == \
        [[t["label"] for t in r["top"]] for r in expected]
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    assert httpx.get(base + "/v1/model").status_code == 401  # the key is on


def test_http_bench_counts_successes_and_errors(server):
    base, *_ = server
    good = asyncio.run(run_load(base, png_bytes(1), concurrency=4, duration_s=1.5, api_key=API_KEY))
    assert good["ok"] > 0 and good["errors"] == 0 and good["requests"] == good["ok"]
    assert good["p50_ms"] <= good["p90_ms"] <= good["p99_ms"]
    bad = asyncio.run(run_load(base, png_bytes(1), concurrency=2, duration_s=1.0, api_key="wrong"))
    assert bad["ok"] == 0 and bad["errors"] == bad["requests"] > 0 and set(bad["by_status"]) == {"401"}


def triton_client(base: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(base.removeprefix("http://"), network_timeout=30)


def triton_infer(base: str, images: np.ndarray, binary_in: bool, binary_out: bool, name: str):
    import tritonclient.http as httpclient

    client = triton_client(base)
    tensor = httpclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary_in)
    outputs = [httpclient.InferRequestedOutput(o, binary_data=binary_out) for o in ("logits", "probabilities")]
    return client.infer(name, [tensor], outputs=outputs, headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_tritonclient_infers_with_json_and_binary_tensors_like_predict(server, tmp_path, binary_in, binary_out):
    base, package, _ = server
    spec = read_package(package).input
    paths = val_png_files(tmp_path, 4)
    images = to_engine_input(np.stack([decode_image(p.read_bytes(), spec.channels, spec.size) for p in paths]),
                             spec.dtype, spec.mean, spec.std)
    name = read_package(package).name
    result = triton_infer(base, images, binary_in, binary_out, name)
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    assert logits.shape == (4, 10) and probabilities.shape == (4, 10)
    predicted = httpx.post(base + "/predict?top_k=10", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths],
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()["predictions"]
    for row, answer in zip(probabilities, predicted):
        by_index = {t["index"]: t["score"] for t in answer["top"]}
        assert np.allclose([row[i] for i in sorted(by_index)], [by_index[i] for i in sorted(by_index)], atol=1e-5)
    assert np.array_equal(logits.argmax(1), [a["top"][0]["index"] for a in predicted])


def test_tritonclient_health_metadata_config_and_readable_errors(server):
    from tritonclient.utils import InferenceServerException

    base, package, _ = server
    name = read_package(package).name
    client = triton_client(base)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name, headers=auth)
    assert client.get_server_metadata(headers=auth)["extensions"] == ["binary_tensor_data", "model_configuration"]
    metadata = client.get_model_metadata(name, headers=auth)
    assert metadata["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}
    assert client.get_model_config(name, headers=auth)["platform"] == "onnxruntime_onnx"
    assert not client.is_model_ready("nope", headers=auth)
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        triton_infer(base, np.zeros((1, 1, 32, 32), np.float32), True, True, "nope")
    with pytest.raises(InferenceServerException, match=r"input shape \[1, 1, 8, 8\] is not \[N, 1, 32, 32\]"):
        triton_infer(base, np.zeros((1, 1, 8, 8), np.float32), True, True, name)


def test_tritonclient_grpc_against_the_real_server_equals_http(server):
    import tritonclient.grpc as grpcclient

    base, package, grpc_url = server
    name = read_package(package).name
    auth = {"authorization": f"Bearer {API_KEY}"}
    client = grpcclient.InferenceServerClient(grpc_url)
    assert client.is_server_ready() and client.is_model_ready(name, headers=auth)
    images = np.random.default_rng(3).standard_normal((5, 1, 32, 32)).astype(np.float32)
    tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    over_grpc = client.infer(name, [tensor], headers=auth).as_numpy("logits")
    over_http = triton_infer(base, images, True, True, name).as_numpy("logits")
    assert over_grpc.shape == (5, 10) and np.array_equal(over_grpc, over_http)


def test_a_second_server_on_the_same_grpc_port_fails_clearly(server, tmp_path):
    _, package, grpc_url = server
    done = subprocess.run([sys.executable, "-m", "cskd", "serve", str(package), "--port", str(free_port()),
                           "--grpc-port", grpc_url.rsplit(":", 1)[1], "--log-level", "warning"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "cannot listen for gRPC" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def api_schema(server):
    base, *_ = server
    return schemathesis.openapi.from_url(base + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzzing_never_gives_a_5xx(case):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"


def as_grpc_request(body, model: str):
    """The v2 JSON request ``body`` as a gRPC ModelInferRequest, or None where protobuf's types cannot hold it
    (a number as a name, a shape past int64...): what a gRPC client could have sent for the same request."""
    from tritonclient.grpc import service_pb2

    from cskd.serve.grpc_service import CONTENTS

    def flat(values):
        return [x for v in values for x in flat(v)] if isinstance(values, list) else [values]

    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not isinstance(body.get("id", ""), str):
        return None
    request = service_pb2.ModelInferRequest(model_name=model, id=body.get("id", ""))
    try:
        for entry in body["inputs"]:
            tensor = request.inputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
            if entry.get("data") is not None:
                getattr(tensor.contents, CONTENTS[entry["datatype"]]).extend(flat(entry["data"]))
        for output in body.get("outputs") or []:
            request.outputs.add(name=output["name"])
    except (KeyError, TypeError, ValueError, AttributeError):  # a value protobuf's typed fields refuse
        return None
    return request


infer_operation = schemathesis.pytest.from_fixture("api_schema").include(path_regex=r"^/v2/models/\{name\}/infer$", method="POST")


@infer_operation.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_v2_requests_get_a_4xx_over_http_and_grpc_never_a_server_failure(case, server):
    """Positive and negative bodies from the request schema (wrong types in every field: a list as
    datatype, strings as shape...), at the real model's name, over HTTP; then the same request over
    gRPC where protobuf's types can hold it."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    base, package, grpc_url = server
    name = read_package(package).name
    case.path_parameters = {**(case.path_parameters or {}), "name": name}
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.body!r:.300}: {response.status_code} {response.text[:300]}"
    request = as_grpc_request(case.body, name)
    if request is None:
        return
    with grpc.insecure_channel(grpc_url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"{request}: {exc.details()}"


def hang_up(base: str, head: bytes, body: bytes, pause_s: float = 0.0) -> None:
    """Send ``head`` and ``body`` over a raw connection, then reset it without reading the answer."""
    import socket
    import struct

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        if body:
            sock.sendall(body)
        time.sleep(pause_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a crashed client


def slow_post(base: str, path: str, body: bytes, content_type: str, chunks: int = 8, pause_s: float = 0.05) -> int:
    """POST ``body`` in ``chunks`` with pauses between them; the answer's status."""
    def pieces():
        step = -(-len(body) // chunks)
        for i in range(0, len(body), step):
            time.sleep(pause_s)
            yield body[i : i + step]

    response = httpx.post(base + path, content=pieces(), timeout=30,
                          headers={"Content-Type": content_type, "Content-Length": str(len(body)), "Authorization": f"Bearer {API_KEY}"})
    return response.status_code


def test_hostile_clients_leave_no_5xx_no_traceback_and_an_empty_queue(server):
    """Clients that hang up mid-body and mid-response, slow senders, and gRPC calls with deadlines too short
    to meet under load: every client that waits gets an answer, nothing is counted as a server failure,
    nothing is logged as one, and the queue is empty afterwards."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    base, package, grpc_url = server
    name = read_package(package).name
    image = png_bytes(3)
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    tensor = np.zeros((4, 1, 32, 32), np.float32)
    v2_json = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensor.shape),
                                      "data": tensor.ravel().tolist()}]}).encode()
    for path, content_type, body in [("/predict", "image/png", image), (f"/v2/models/{name}/infer", "application/json", v2_json),
                                     ("/predict", "multipart/form-data; boundary=xx", b"--xx\r\nContent-Disposition: form-data")]:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body) + 5000}\r\n").encode() + auth + b"\r\n"
        hang_up(base, head, body[: len(body) // 2], pause_s=0.05)  # mid-body
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n").encode() + auth + b"\r\n"
        hang_up(base, head, body)  # a whole request, then gone before the answer
    assert slow_post(base, "/predict", image, "image/png") == 200
    assert slow_post(base, f"/v2/models/{name}/infer", v2_json, "application/json") == 200

    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="input", datatype="FP32", shape=list(tensor.shape))
    request.raw_input_contents.append(tensor.tobytes())
    metadata = [("authorization", f"Bearer {API_KEY}")]
    with grpc.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request, metadata=metadata, timeout=timeout)
                 for timeout in [0.001, 0.003, 0.01, 30.0] * 25]  # 100 at once: the short ones expire queued or running
        codes = [call.code() for call in calls]  # each waits for its call's end
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
    assert codes.count(grpc.StatusCode.OK) >= 25  # every call with time to wait was answered

    auth_header = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.time() + 10
    while time.time() < deadline:  # the server finishes what the leavers left behind
        metrics = httpx.get(base + "/metrics", headers=auth_header).text
        if metric_series(metrics, "cskd_queue_depth_images") == [0.0]:
            break
        time.sleep(0.2)
    statuses = [line for line in metrics.splitlines() if line.startswith("cskd_http_requests_total{")]
    failures = [line for line in statuses if re.search(r'status="(5\d\d|INTERNAL|UNKNOWN)"', line)]
    assert not failures and metric_series(metrics, "cskd_queue_depth_images", model=name) == [0.0]
    assert any('status="499"' in line for line in statuses)  # the hang-ups, counted as such
    assert "Traceback" not in (package.parent / "server.log").read_text()
    assert httpx.post(base + "/predict", content=image, headers={**auth_header, "Content-Type": "image/png"}).status_code == 200
