"""A real `cskd serve` process on loopback: answers, NVIDIA's KServe v2 clients (HTTP and gRPC), load, and a
schemathesis run with no 5xx."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cskd.bench_served import free_port
from cskd.export.exporter import ExportOptions, export_model
from cskd.loadtest import run_load
from cskd.runtime.package import read_package
from cskd.runtime.predict import predict_files
from cskd.runtime.preprocess import decode_image, to_engine_input
from tests.test_serve_app import png_bytes, val_png_files

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    package = tmp_path_factory.mktemp("uvicorn") / "pkg"
    export_model(trained_run, ExportOptions(out=package, parity_images=100), log=lambda _: None)
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cskd", "serve", str(package), "--port", str(port), "--grpc-port", str(grpc_port),
                             "--max-wait-ms", "5", "--api-key", API_KEY, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"cskd serve exited: {proc.stdout.read()}")
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("cskd serve did not become ready in 90 s")
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
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration"]
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
    return schemathesis.openapi.from_url(base + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzzing_never_gives_a_5xx(case):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
