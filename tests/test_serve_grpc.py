"""KServe v2 over gRPC beside HTTP: NVIDIA's own client (tritonclient.grpc) against the app's gRPC port,
answers equal to the engine's and to HTTP's, errors as gRPC status codes, limits and key shared with HTTP."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.served import free_port
from cskd.serve.app import create_app

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the gRPC test needs tritonclient[grpc] (the dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def package_dir(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpc") / "pkg"
    export_model(trained_run, ExportOptions(out=out, parity_images=100), log=lambda _: None)
    return out


def served(package_dir, **settings):
    """(TestClient, app, gRPC client) of an app whose lifespan runs, with gRPC on a free port."""
    port = free_port()
    app = create_app(package_dir, grpc_port=port, **settings)
    return TestClient(app), app, grpcclient.InferenceServerClient(f"127.0.0.1:{port}")


def infer_input(x: np.ndarray, datatype: str = "FP32"):
    tensor = grpcclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def test_tritonclient_grpc_metadata_config_and_inference_match_the_engine_and_http(package_dir):
    import onnxruntime as ort

    http, app, client = served(package_dir)
    with http:
        name = app.state.serving.default.name
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
        assert list(client.get_server_metadata().extensions) == ["binary_tensor_data", "model_configuration"]
        meta = client.get_model_metadata(name, as_json=True)
        assert meta == {**http.get(f"/v2/models/{name}").json(), "inputs": meta["inputs"], "outputs": meta["outputs"]}
        assert meta["inputs"][0]["shape"] == ["-1", "1", "32", "32"]  # int64 travels as strings in protobuf JSON
        config = client.get_model_config(name).config
        assert config.max_batch_size == app.state.serving.default.max_batch and list(config.input[0].dims) == [1, 32, 32]

        x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
        result = client.infer(name, [infer_input(x)], request_id="r7")
        direct = ort.InferenceSession(str(package_dir / "model.optimized.onnx")).run(["logits"], {"input": x})[0]
        logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
        assert np.allclose(logits, direct, atol=1e-5) and result.get_response().id == "r7"
        assert np.allclose(probabilities, np.exp(direct) / np.exp(direct).sum(1, keepdims=True), atol=1e-6)

        only = client.infer(name, [infer_input(x)], outputs=[grpcclient.InferRequestedOutput("probabilities")])
        assert only.as_numpy("logits") is None and np.array_equal(only.as_numpy("probabilities"), probabilities)

        body = {"inputs": [{"name": "input", "shape": [3, 1, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
        json_logits = {o["name"]: o for o in http.post(f"/v2/models/{name}/infer", json=body).json()["outputs"]}["logits"]
        assert np.array_equal(np.array(json_logits["data"], np.float32).reshape(3, 10), logits)


def test_typed_contents_are_accepted_like_raw_bytes(package_dir):
    from tritonclient.grpc import service_pb2

    http, app, client = served(package_dir)
    with http:
        name = app.state.serving.default.name
        x = np.random.default_rng(1).standard_normal((2, 1, 32, 32)).astype(np.float32)
        request = service_pb2.ModelInferRequest(model_name=name)
        entry = request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 32, 32])
        entry.contents.fp32_contents.extend(x.ravel().tolist())
        response = client._client_stub.ModelInfer(request)
        typed = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
        assert np.array_equal(typed, client.infer(name, [infer_input(x)]).as_numpy("logits"))


@pytest.mark.parametrize("case, code", [
    ("unknown model", "StatusCode.NOT_FOUND"),
    ("unknown version", "StatusCode.NOT_FOUND"),
    ("wrong shape", "StatusCode.INVALID_ARGUMENT"),
    ("wrong datatype", "StatusCode.INVALID_ARGUMENT"),
    ("NaN pixels", "StatusCode.INVALID_ARGUMENT"),
    ("too many images", "StatusCode.RESOURCE_EXHAUSTED"),
    ("unknown output", "StatusCode.INVALID_ARGUMENT"),
    ("raw bytes of the wrong length", "StatusCode.INVALID_ARGUMENT"),
    ("message over the body limit", "StatusCode.RESOURCE_EXHAUSTED"),
])
def test_bad_requests_get_a_status_code_and_the_server_keeps_serving(package_dir, case, code):
    from tritonclient.grpc import service_pb2

    http, app, client = served(package_dir, max_images=4, max_body_bytes=100_000)
    with http:
        name = app.state.serving.default.name
        one = np.zeros((1, 1, 32, 32), np.float32)

        def raw_request(data: bytes):
            request = service_pb2.ModelInferRequest(model_name=name)
            request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
            request.raw_input_contents.append(data)
            return lambda: client._client_stub.ModelInfer(request)

        call = {
            "unknown model": lambda: client.infer("nope", [infer_input(one)]),
            "unknown version": lambda: client.infer(name, [infer_input(one)], model_version="7"),
            "wrong shape": lambda: client.infer(name, [infer_input(np.zeros((1, 1, 32, 31), np.float32))]),
            "wrong datatype": lambda: client.infer(name, [infer_input(np.zeros((1, 1, 32, 32), np.float64), "FP64")]),
            "NaN pixels": lambda: client.infer(name, [infer_input(np.full((1, 1, 32, 32), np.nan, np.float32))]),
            "too many images": lambda: client.infer(name, [infer_input(np.zeros((5, 1, 32, 32), np.float32))]),
            "unknown output": lambda: client.infer(name, [infer_input(one)], outputs=[grpcclient.InferRequestedOutput("x")]),
            "raw bytes of the wrong length": raw_request(b"\0" * 100),
            "message over the body limit": lambda: client.infer(name, [infer_input(np.zeros((30, 1, 32, 32), np.float32))]),
        }[case]
        if case.startswith("raw"):
            import grpc

            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert str(raised.value.code()) == code and "4096 bytes" in raised.value.details()
        else:
            assert status_of(call) == code
        assert client.infer(name, [infer_input(one)]).as_numpy("logits").shape == (1, 10)  # still serving


def test_the_api_key_guards_every_rpc_but_health(package_dir):
    http, app, client = served(package_dir, api_key="s3cret")
    with http:
        name = app.state.serving.default.name
        assert client.is_server_live() and client.is_server_ready()
        assert status_of(lambda: client.get_model_metadata(name)) == "StatusCode.UNAUTHENTICATED"
        assert status_of(lambda: client.get_server_metadata()) == "StatusCode.UNAUTHENTICATED"  # as GET /v2
        assert client.get_server_metadata(headers={"authorization": "Bearer s3cret"}).name == "cskd"
        one = infer_input(np.zeros((1, 1, 32, 32), np.float32))
        assert status_of(lambda: client.infer(name, [one], headers={"authorization": "Bearer wrong"})) == "StatusCode.UNAUTHENTICATED"
        assert client.infer(name, [one], headers={"authorization": "Bearer s3cret"}).as_numpy("logits").shape == (1, 10)


def test_a_stuck_backend_answers_deadline_exceeded_and_turns_unready(package_dir):
    http, app, client = served(package_dir, request_timeout_s=0.5)
    release = threading.Event()
    with http:
        name = app.state.serving.default.name
        real = app.state.serving.default.batcher.infer
        app.state.serving.default.batcher.infer = lambda batch: (release.wait(20), real(batch))[1]
        one = infer_input(np.zeros((1, 1, 32, 32), np.float32))
        assert status_of(lambda: client.infer(name, [one])) == "StatusCode.DEADLINE_EXCEEDED"
        assert not client.is_server_ready() and not client.is_model_ready(name)
        release.set()
        app.state.serving.default.batcher.infer = real
        assert client.infer(name, [one]).as_numpy("logits").shape == (1, 10)
        assert client.is_server_ready()


def counted(text: str, **labels: str) -> float:
    """The value of the cskd_http_requests_total series with these labels (in whatever order they print)."""
    for line in text.splitlines():
        if line.startswith("cskd_http_requests_total{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_grpc_calls_are_counted_in_the_prometheus_metrics(package_dir):
    http, app, client = served(package_dir)
    with http:
        name = app.state.serving.default.name
        for _ in range(3):
            client.infer(name, [infer_input(np.zeros((1, 1, 32, 32), np.float32))])
        status_of(lambda: client.infer("nope", [infer_input(np.zeros((1, 1, 32, 32), np.float32))]))
        text = http.get("/metrics").text
        ok = counted(text, route="ModelInfer", method="grpc", status="OK")
        missing = counted(text, route="ModelInfer", method="grpc", status="NOT_FOUND")
        assert ok == 3 and missing == 1


def test_a_message_over_the_size_limit_is_refused_and_counted(package_dir):
    """gRPC's core refused it before any handler ran, so the refusal never reached the request counters."""
    http, app, client = served(package_dir, max_images=64, max_body_bytes=100_000)
    with http:
        name = app.state.serving.default.name
        big = infer_input(np.zeros((30, 1, 32, 32), np.float32))  # 122,880 bytes of tensor
        assert status_of(lambda: client.infer(name, [big])) == "StatusCode.RESOURCE_EXHAUSTED"
        assert counted(http.get("/metrics").text, route="ModelInfer", method="grpc", status="RESOURCE_EXHAUSTED") == 1
