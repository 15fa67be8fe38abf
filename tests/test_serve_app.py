"""The FastAPI app in-process: predictions, batching, overload, KServe v2, auth, bad input."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cskd.export.exporter import ExportOptions, export_model
from cskd.runtime.predict import predict_files
from cskd.serve.app import create_app


@pytest.fixture(scope="module")
def package_dir(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "pkg"
    export_model(trained_run, ExportOptions(out=out, parity_images=100), log=lambda _: None)
    return out


@pytest.fixture
def client(package_dir):
    with TestClient(create_app(package_dir, max_wait_ms=2)) as c:  # the context runs the lifespan
        yield c


def png_bytes(seed: int = 0, size=(28, 28)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def val_png_files(folder, count: int):
    from cskd.data.datasets import build_dataset

    dataset, _ = build_dataset("fashion-mnist-demo", "val")
    paths = []
    for i in range(count):
        path = folder / f"v{i}.png"
        dataset[i * 53][0].save(path)
        paths.append(path)
    return paths


def metric_series(text: str, name: str, **labels: str) -> list:
    """The values of every ``name`` series in Prometheus text whose labels include ``labels``."""
    values = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == name and all(f'{key}="{wanted}"' in label_text for key, wanted in labels.items()):
            values.append(float(value))
    return values


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the ``name`` series whose labels include ``labels`` (0 when there is none)."""
    return sum(metric_series(text, name, **labels))


def test_predict_multipart_equals_cskd_predict(client, package_dir, tmp_path):
    paths = val_png_files(tmp_path, 6)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    response = client.post("/predict?top_k=3", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predict_files(package_dir, paths, k=3)
    assert [[t["index"] for t in r["top"]] for r in body["predictions"]] == [[t["index"] for t in r["top"]] for r in expected]
    got = np.array([[t["score"] for t in r["top"]] for r in body["predictions"]])
    assert np.allclose(got, [[t["score"] for t in r["top"]] for r in expected], atol=1e-6)
    assert body["model"].startswith("student-") and len(body["predictions"][0]["top"]) == 3


def test_predict_json_base64_equals_multipart(client):
    images = [png_bytes(1), png_bytes(2)]
    multipart = client.post("/predict", files=[("files", ("a.png", b, "image/png")) for b in images]).json()
    as_json = client.post("/predict", json={"images": [base64.b64encode(b).decode() for b in images], "top_k": 5}).json()
    assert multipart["predictions"] == as_json["predictions"]


def test_concurrent_requests_are_batched(package_dir):
    with TestClient(create_app(package_dir, max_wait_ms=50, max_batch=16)) as c:
        image = png_bytes(3)
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: c.post("/predict", files={"files": ("x.png", image, "image/png")}), range(32)))
        assert all(r.status_code == 200 for r in responses)
        # each caller got its own (same) row; scores may differ in the last float bits between batch sizes
        tops = [r.json()["predictions"][0]["top"] for r in responses]
        assert all([t["index"] for t in top] == [t["index"] for t in tops[0]] for top in tops)
        assert np.allclose([[t["score"] for t in top] for top in tops], [t["score"] for t in tops[0]], atol=1e-5)
        text = c.get("/metrics").text
        calls = metric_value(text, "cskd_batch_size_images_count")
        images = metric_value(text, "cskd_batch_size_images_sum")
        assert images >= 32 and calls < images  # fewer inference calls than images: batches above 1
        assert metric_value(text, "cskd_batch_size_images_bucket", le="1.0") < calls


def test_overload_answers_503_with_retry_after_then_recovers(package_dir):
    app = create_app(package_dir, max_queue=2, max_images=2, max_batch=1, max_wait_ms=0)
    with TestClient(app) as c:
        backend_infer = app.state.serving.default.batcher.infer

        def slow(batch):
            time.sleep(0.2)
            return backend_infer(batch)

        app.state.serving.default.batcher.infer = slow
        image = png_bytes(4)
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: c.post("/predict", files={"files": ("x.png", image, "image/png")}), range(12)))
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and refused.json()["code"] == "overloaded"
        app.state.serving.default.batcher.infer = backend_infer
        assert c.post("/predict", files={"files": ("x.png", image, "image/png")}).status_code == 200


def test_kserve_v2_round_trip(client, package_dir):
    model = client.get("/v1/model").json()
    name = model["name"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}
    assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    body = {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "logits"}, {"name": "probabilities"}]}
    response = client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    assert response.json()["id"] == "r1" and out["logits"]["shape"] == [3, 10]
    import onnxruntime as ort

    direct = ort.InferenceSession(str(package_dir / "model.optimized.onnx")).run(["logits"], {"input": x})[0]
    assert np.allclose(np.array(out["logits"]["data"]).reshape(3, 10), direct, atol=1e-5)
    assert np.allclose(np.array(out["probabilities"]["data"]).reshape(3, 10).sum(1), 1.0, atol=1e-5)


def test_raw_image_body_equals_multipart(client):
    image = png_bytes(3, size=(40, 30))  # not square: resized and centre-cropped like the eval transform
    raw = client.post("/predict?top_k=4", content=image, headers={"content-type": "image/png"})
    multipart = client.post("/predict?top_k=4", files={"files": ("x.png", image, "image/png")})
    assert raw.status_code == 200 and raw.json() == multipart.json()


def test_v2_binary_tensors_in_and_out(client, package_dir):
    name = client.get("/v1/model").json()["name"]
    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "logits"}]}).encode()
    response = client.post(f"/v2/models/{name}/versions/1/infer", content=header + x.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})  # no content type, like tritonclient
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 10)
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "logits"]
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 80} and "data" in meta["outputs"][1]
    logits = np.array(meta["outputs"][1]["data"], dtype=np.float32).reshape(2, 10)
    import onnxruntime as ort

    direct = ort.InferenceSession(str(package_dir / "model.optimized.onnx")).run(["logits"], {"input": x})[0]
    assert np.allclose(logits, direct, atol=1e-5)
    assert np.allclose(probabilities, np.exp(direct) / np.exp(direct).sum(1, keepdims=True), atol=1e-6)


def test_v2_server_metadata_and_triton_model_config(client):
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_configuration"]
    name = client.get("/v1/model").json()["name"]
    config = client.get(f"/v2/models/{name}/config").json()
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's own schema accepts it
    assert parsed.name == name and parsed.platform == "onnxruntime_onnx" and list(parsed.input[0].dims) == [1, 32, 32]
    assert parsed.max_batch_size == client.get("/v1/model").json()["max_batch"]


def test_api_key_guards_everything_but_health(package_dir):
    with TestClient(create_app(package_dir, api_key="s3cret")) as c:
        image = {"files": ("x.png", png_bytes(5), "image/png")}
        denied = c.post("/predict", files=image)
        assert denied.status_code == 401 and denied.json()["code"] == "unauthorized"
        assert c.post("/predict", files=image, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/predict", files=image, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        name = c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).json()["name"]
        guarded = ("/v1/model", "/v1/models", "/metrics", "/docs", "/openapi.json", "/v2", f"/v2/models/{name}", f"/v2/models/{name}/ready",
                   f"/v2/models/{name}/config")
        for path in guarded:  # as the README says: everything but the health checks
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert c.post("/v2/repository/index").status_code == 401
        assert c.post("/v2/repository/index", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/shadow").status_code == 401  # behind the key before it says there is no shadow
        assert c.get("/v1/shadow", headers={"Authorization": "Bearer s3cret"}).status_code == 404
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200
    with TestClient(create_app(package_dir)) as c:  # no key configured: open
        assert c.post("/predict", files={"files": ("x.png", png_bytes(5), "image/png")}).status_code == 200
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").json()["info"]["title"] == "cskd inference"


def binary_request(tensor: dict, claimed_size: int, extra_bytes: int) -> bytes:
    """A v2 body whose binary tensor is shorter than its binary_data_size claims."""
    header = json.dumps({"inputs": [{"name": tensor["name"], "shape": tensor["shape"], "datatype": "FP32",
                                     "parameters": {"binary_data_size": claimed_size}}]}).encode()
    binary_request.headers = {"Inference-Header-Content-Length": str(len(header))}
    return header + b"\0" * extra_bytes


HUGE = b"9" * 5000  # an integer past Python's 4,300-digit conversion limit


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 megapixels in a few kB
    return buf.getvalue()


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(buf, format=fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    "kind, status, code",
    [
        ("truncated png", 400, "bad_image"),
        ("truncated jpeg", 400, "bad_image"),
        ("not an image", 400, "bad_image"),
        ("empty body", 415, "unsupported_media_type"),
        ("wrong content type", 415, "unsupported_media_type"),
        ("image bomb", 400, "bad_image"),
        ("body over limit", 413, "too_large"),
        ("too many images", 413, "too_large"),
        ("invalid base64", 400, "bad_image"),
        ("invalid json", 422, "invalid_request"),
        ("top_k out of range", 422, "invalid_request"),
        ("raw body not an image", 400, "bad_image"),
        ("v2 wrong shape", 400, "invalid_tensor"),
        ("v2 data not matching the shape", 400, "invalid_request"),
        ("v2 wrong datatype", 400, "invalid_tensor"),
        ("v2 unknown model", 404, "model_not_found"),
        ("v2 unknown version", 404, "model_not_found"),
        ("v2 binary size lies", 400, "invalid_request"),
        ("v2 header length past the body", 400, "invalid_request"),
        ("v2 not json", 400, "invalid_request"),
        ("v2 unknown output", 400, "invalid_tensor"),
        ("v2 parameters not an object", 400, "invalid_request"),
        ("v2 deeply nested json", 400, "invalid_request"),
        ("far too many files", 413, "too_large"),
        ("multipart top_k 0", 422, "invalid_request"),
        ("deeply nested json", 422, "invalid_request"),
        ("json top_k of 5000 digits", 422, "invalid_request"),
        ("multipart top_k of 5000 digits", 422, "invalid_request"),
        ("query top_k of 5000 digits", 422, "invalid_request"),
        ("v2 shape of 5000 digits", 400, "invalid_request"),
        ("v2 binary_data_size of 5000 digits", 400, "invalid_request"),
        ("v2 header length of 5000 digits", 400, "invalid_request"),
        # JSON of another type where the protocol says a string, a list or an object: these were 500s
        ("v2 datatype a list", 400, "invalid_request"),
        ("v2 datatype an object", 400, "invalid_request"),
        ("v2 name a number", 400, "invalid_request"),
        ("v2 shape a string", 400, "invalid_request"),
        ("v2 shape of floats", 400, "invalid_request"),
        ("v2 inputs an object", 400, "invalid_request"),
        ("v2 outputs a string", 400, "invalid_request"),
        ("v2 binary_data a string", 400, "invalid_request"),
        ("v2 id a number", 400, "invalid_request"),
        ("v2 values past float32", 400, "invalid_request"),
        ("v2 finite input the model overflows on", 400, "non_finite_output"),
    ],
)
def test_bad_input_gets_the_right_4xx_and_the_server_keeps_working(package_dir, kind, status, code):
    with TestClient(create_app(package_dir, max_images=4, max_body_bytes=200_000)) as c:
        name = c.get("/v1/model").json()["name"]
        files = lambda data: {"files": ("x", data, "application/octet-stream")}  # noqa: E731
        tensor = {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}
        v2 = lambda entry: c.post(f"/v2/models/{name}/infer", json={"inputs": [entry]})  # noqa: E731
        send = {
            "truncated png": lambda: c.post("/predict", files=files(_truncated("PNG"))),
            "truncated jpeg": lambda: c.post("/predict", files=files(_truncated("JPEG"))),
            "not an image": lambda: c.post("/predict", files=files(b"%PDF-1.4 definitely not pixels")),
            "empty body": lambda: c.post("/predict"),
            "wrong content type": lambda: c.post("/predict", content=b"abc", headers={"content-type": "text/plain"}),
            "image bomb": lambda: c.post("/predict", files=files(_bomb())),
            "body over limit": lambda: c.post("/predict", files=files(b"\0" * 300_000)),
            "too many images": lambda: c.post("/predict", files=[("files", ("x.png", png_bytes(i), "image/png")) for i in range(5)]),
            "invalid base64": lambda: c.post("/predict", json={"images": ["not base64!!"]}),
            "invalid json": lambda: c.post("/predict", content=b"{oops", headers={"content-type": "application/json"}),
            "top_k out of range": lambda: c.post("/predict?top_k=0", files={"files": ("x.png", png_bytes(), "image/png")}),
            "raw body not an image": lambda: c.post("/predict", content=b"GIF89a garbage", headers={"content-type": "image/gif"}),
            "v2 wrong shape": lambda: c.post(f"/v2/models/{name}/infer",
                                             json={"inputs": [{**tensor, "shape": [1, 1, 16, 64]}]}),
            "v2 data not matching the shape": lambda: c.post(f"/v2/models/{name}/infer",
                                                             json={"inputs": [{**tensor, "shape": [1, 3, 32, 32]}]}),
            "v2 wrong datatype": lambda: c.post(f"/v2/models/{name}/infer", json={"inputs": [{**tensor, "datatype": "INT64"}]}),
            "v2 unknown model": lambda: c.post("/v2/models/nope/infer", json={"inputs": [tensor]}),
            "v2 unknown version": lambda: c.post(f"/v2/models/{name}/versions/7/infer", json={"inputs": [tensor]}),
            "v2 binary size lies": lambda: c.post(f"/v2/models/{name}/infer", content=binary_request(tensor, 4096, 10),
                                                  headers=binary_request.headers),
            "v2 header length past the body": lambda: c.post(f"/v2/models/{name}/infer", content=b"{}",
                                                             headers={"Inference-Header-Content-Length": "99"}),
            "v2 not json": lambda: c.post(f"/v2/models/{name}/infer", content=b"\x00\x01binary junk"),
            "v2 unknown output": lambda: c.post(f"/v2/models/{name}/infer",
                                                json={"inputs": [tensor], "outputs": [{"name": "features"}]}),
            "v2 parameters not an object": lambda: c.post(f"/v2/models/{name}/infer",
                                                          json={"inputs": [{**tensor, "parameters": [1]}]}),
            "v2 deeply nested json": lambda: c.post(f"/v2/models/{name}/infer", content=b"[" * 50000 + b"]" * 50000),
            "far too many files": lambda: c.post("/predict", files=[("files", ("x.png", png_bytes(i), "image/png"))
                                                                    for i in range(9)]),
            "multipart top_k 0": lambda: c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")},
                                                data={"top_k": "0"}),
            "deeply nested json": lambda: c.post("/predict", content=b"[" * 50000 + b"]" * 50000,
                                                 headers={"content-type": "application/json"}),
            # Python's int() refuses over 4,300 digits with a plain ValueError: these were 500s
            "json top_k of 5000 digits": lambda: c.post("/predict", content=b'{"images": ["AA=="], "top_k": ' + HUGE + b"}",
                                                        headers={"content-type": "application/json"}),
            "multipart top_k of 5000 digits": lambda: c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")},
                                                             data={"top_k": HUGE.decode()}),
            "query top_k of 5000 digits": lambda: c.post("/predict?top_k=" + HUGE.decode(),
                                                         files={"files": ("x.png", png_bytes(), "image/png")}),
            "v2 shape of 5000 digits": lambda: c.post(f"/v2/models/{name}/infer", headers={"content-type": "application/json"},
                                                      content=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": ['
                                                              + HUGE + b'], "data": [0]}]}'),
            "v2 binary_data_size of 5000 digits": lambda: c.post(
                f"/v2/models/{name}/infer", content=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], '
                                                    b'"parameters": {"binary_data_size": ' + HUGE + b"}}]}"),
            "v2 header length of 5000 digits": lambda: c.post(f"/v2/models/{name}/infer", content=b"{}",
                                                              headers={"Inference-Header-Content-Length": HUGE.decode()}),
            "v2 datatype a list": lambda: v2({**tensor, "datatype": ["FP32"]}),
            "v2 datatype an object": lambda: v2({**tensor, "datatype": {"a": 1}}),
            "v2 name a number": lambda: v2({**tensor, "name": 7}),
            "v2 shape a string": lambda: v2({**tensor, "shape": "1,1,32,32"}),
            "v2 shape of floats": lambda: v2({**tensor, "shape": [1.0, 1, 32, 32]}),
            "v2 inputs an object": lambda: c.post(f"/v2/models/{name}/infer", json={"inputs": tensor}),
            "v2 outputs a string": lambda: c.post(f"/v2/models/{name}/infer", json={"inputs": [tensor], "outputs": "logits"}),
            "v2 binary_data a string": lambda: c.post(f"/v2/models/{name}/infer", json={
                "inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}),
            "v2 id a number": lambda: c.post(f"/v2/models/{name}/infer", json={"id": 5, "inputs": [tensor]}),
            "v2 values past float32": lambda: v2({**tensor, "data": [1e39] * 1024}),
            # finite float32 inputs, far outside any image's range: the logits overflow to NaN (was: bare NaN in the JSON)
            "v2 finite input the model overflows on": lambda: v2({**tensor, "data": [3e38, -3e38] * 512}),
        }[kind]
        response = send()
        assert response.status_code == status, response.text
        body = json.loads(response.text, parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))
        if kind.startswith("v2"):  # the v2 protocol's error body, which tritonclient reads
            assert set(body) == {"error", "code"} and body["code"] == code and body["error"]
        else:
            assert set(body) == {"code", "message"} and body["code"] == code
        ok = c.post("/predict", files={"files": ("x.png", png_bytes(9), "image/png")})
        assert ok.status_code == 200  # still answering correctly


def test_a_failing_backend_answers_json_500_and_the_server_keeps_working(package_dir):
    app = create_app(package_dir)
    with TestClient(app, raise_server_exceptions=False) as c:
        name = c.get("/v1/model").json()["name"]
        real = app.state.serving.default.batcher.infer
        app.state.serving.default.batcher.infer = lambda batch: (_ for _ in ()).throw(RuntimeError("device lost"))
        broken = c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")})
        assert broken.status_code == 500 and broken.json()["code"] == "internal_error" and "device lost" in broken.json()["message"]
        tensor = {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}
        v2 = c.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]})
        assert v2.status_code == 500 and "device lost" in v2.json()["error"]  # readable by tritonclient
        app.state.serving.default.batcher.infer = real
        assert c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")}).status_code == 200


def test_a_grpc_port_equal_to_the_http_port_is_refused_at_start(package_dir):
    with pytest.raises(ValueError, match="give gRPC its own port"):
        create_app(package_dir, port=8000, grpc_port=8000)


def test_a_queue_smaller_than_one_request_is_refused_at_start(package_dir):
    with pytest.raises(ValueError, match="max_queue=8 is below max_images=64"):
        create_app(package_dir, max_queue=8)


def test_not_ready_until_the_lifespan_ran(package_dir):
    client = TestClient(create_app(package_dir))  # not entered: no lifespan, no model
    assert client.get("/readyz").status_code == 503
    assert client.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")}).status_code == 503
    assert client.get("/healthz").status_code == 200


def test_serving_path_imports_without_torch(package_dir, tmp_path):
    import subprocess
    import sys

    (tmp_path / "x.png").write_bytes(png_bytes(7))
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
        "from fastapi.testclient import TestClient\n"
        "from cskd.serve.app import create_app\n"
        f"c = TestClient(create_app({str(package_dir)!r})).__enter__()\n"
        f"r = c.post('/predict', files={{'files': ('x.png', open({str(tmp_path / 'x.png')!r}, 'rb').read(), 'image/png')}})\n"
        "assert r.status_code == 200, r.text\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_a_content_length_of_5000_digits_is_413_not_a_crash(package_dir):
    import asyncio

    from cskd.serve.app import BodyLimitMiddleware

    async def never_called(scope, receive, send):
        raise AssertionError("the body limit let it through")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/predict", "headers": [(b"content-length", HUGE)]}
    asyncio.run(BodyLimitMiddleware(never_called, limit=1024)(scope, None, send))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["code"] == "too_large"


def test_a_stuck_backend_turns_the_server_unready_and_requests_end_by_their_deadline(package_dir):
    import threading

    app = create_app(package_dir, request_timeout_s=0.5)
    release = threading.Event()
    with TestClient(app) as c:
        real = app.state.serving.default.batcher.infer
        app.state.serving.default.batcher.infer = lambda batch: (release.wait(20), real(batch))[1]
        started = time.perf_counter()
        stuck = c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")})
        elapsed = time.perf_counter() - started
        assert stuck.status_code == 504 and stuck.json()["code"] == "timeout", stuck.text
        assert elapsed < 5  # its own deadline, not the backend's 20 s
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "backend" in ready.json()["reason"]
        assert c.get("/v2/health/ready").status_code == 503
        name = app.state.serving.default.name
        model_ready = c.get(f"/v2/models/{name}/ready")  # was 200 {"ready": false}: tritonclient read it as ready
        assert model_ready.status_code == 503 and model_ready.json() == {"name": name, "ready": False}
        queued = c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")})  # behind the stuck call
        assert queued.status_code == 503 and queued.json()["code"] == "overloaded"
        release.set()  # the backend comes back: ready again, and answering
        app.state.serving.default.batcher.infer = real
        deadline = time.time() + 5
        while c.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert c.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        assert c.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")}).status_code == 200


def test_inference_routes_are_counted_under_their_own_route_label(client):
    name = client.get("/v1/model").json()["name"]
    assert client.post("/predict", files={"files": ("x.png", png_bytes(), "image/png")}).status_code == 200
    tensor = {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}
    assert client.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]}).status_code == 200
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("cskd_http_requests_total{")]
    assert any('route="/predict"' in line and 'status="200"' in line for line in lines)
    assert any('route="/v2/models/{name}/infer"' in line for line in lines)
    assert not any('route="unmatched"' in line for line in lines)


@pytest.mark.parametrize("path, content_type", [("/predict", "image/png"), ("/predict", "multipart/form-data; boundary=x"),
                                                ("/v2/models/{name}/infer", "application/json")])
def test_a_client_hanging_up_mid_body_is_counted_499_not_a_server_failure(package_dir, caplog, path, content_type):
    import asyncio

    app = create_app(package_dir)
    with TestClient(app) as c:
        name = c.get("/v1/model").json()["name"]
        messages = [{"type": "http.request", "body": b"--x\r\nContent-Disposition: form-data; name=\"files\"; fil", "more_body": True},
                    {"type": "http.disconnect"}]
        scope = {"type": "http", "method": "POST", "path": path.format(name=name), "raw_path": b"", "query_string": b"",
                 "headers": [(b"content-type", content_type.encode()), (b"content-length", b"100000")],
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "root_path": ""}
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        with caplog.at_level("ERROR"):
            asyncio.run(app(scope, receive, send))
        metrics = c.get("/metrics").text
    assert sent == []  # nobody to answer
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # was: a traceback, "POST /predict failed"
    route = path if "{name}" in path else "/predict"
    assert metric_value(metrics, "cskd_http_requests_total", method="POST", route=route, status="499") == 1
    assert 'status="500"' not in metrics
