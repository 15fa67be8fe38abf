"""A real `cskd serve` process on loopback: answers, load, and a schemathesis run with no 5xx."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cskd.export.exporter import ExportOptions, export_model
from cskd.loadtest import run_load
from cskd.runtime.predict import predict_files
from tests.test_serve_app import png_bytes, val_png_files

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    package = tmp_path_factory.mktemp("uvicorn") / "pkg"
    export_model(trained_run, ExportOptions(out=package, parity_images=100), log=lambda _: None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cskd", "serve", str(package), "--port", str(port),
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
    yield base, package
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_real_server_answers_like_cskd_predict(server, tmp_path):
    base, package = server
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
    base, _ = server
    good = asyncio.run(run_load(base, png_bytes(1), concurrency=4, duration_s=1.5, api_key=API_KEY))
    assert good["ok"] > 0 and good["errors"] == 0 and good["requests"] == good["ok"]
    assert good["p50_ms"] <= good["p90_ms"] <= good["p99_ms"]
    bad = asyncio.run(run_load(base, png_bytes(1), concurrency=2, duration_s=1.0, api_key="wrong"))
    assert bad["ok"] == 0 and bad["errors"] == bad["requests"] > 0 and set(bad["by_status"]) == {"401"}


@pytest.fixture(scope="module")
def api_schema(server):
    base, _ = server
    return schemathesis.openapi.from_url(base + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzzing_never_gives_a_5xx(case):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
