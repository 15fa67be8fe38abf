"""What is deployed, measured: each package behind ``cskd serve``, driven by a compiled load generator.

``cskd bench ... --served`` runs this after the engine benchmark, in the same run: every package is
served by its own ``cskd serve`` process (same settings and cores; idle servers cost nothing, their
runtimes do not spin), and ``hey`` (Debian package ``hey``, compiled, so the client does not eat
the cores a Python client would) posts one validation image per request as a KServe v2 binary
tensor, at each concurrency, servers interleaved round by round. Reports served p50/p99 latency,
throughput and non-2xx answers, and the served speedup over the served teacher beside the engine's:
at concurrency 1 the p50 ratio (against the engine's batch-1 p50 ratio), above it the throughput
ratio (against the engine's at the largest benchmarked batch not above the concurrency).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from cskd.errors import CSKDError
from cskd.runtime.package import ModelPackage

V2_DATATYPES = {"float32": "FP32", "uint8": "UINT8", "float16": "FP16"}


@dataclass
class ServedOptions:
    concurrency: Sequence[int] = (1, 16)
    seconds: float = 10.0  # of load per package, concurrency and round
    rounds: int = 1
    threads: Optional[int] = None  # onnxruntime threads of each server (default: all cores)
    serve_args: Sequence[str] = ()  # further `cskd serve` flags, the same for every package
    ready_timeout_s: float = 120.0


@dataclass
class ServedModel:
    label: str
    role: str
    folder: Path
    package: ModelPackage
    row: np.ndarray  # one engine-ready image [1, C, H, W]
    runs: Dict[int, List[Dict]] = field(default_factory=dict)  # concurrency -> parsed hey runs


def check_served_tools() -> None:
    """What ``--served`` needs, checked before any work (a plan or bench builds and times everything else
    first): hey on PATH, and the HTTP stack ``cskd serve`` runs on."""
    if shutil.which("hey") is None:
        raise CSKDError("--served loads each package behind cskd serve with hey, a compiled load generator, and hey is not on "
                        "PATH: install it (apt-get install hey on Debian/Ubuntu, or see https://github.com/rakyll/hey), or drop --served")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise CSKDError(f"--served runs each package in cskd serve, which needs {' and '.join(missing)} (not installed): "
                        "pip install 'cskd[http]', or drop --served")


def v2_binary_request(name: str, row: np.ndarray, dtype: str) -> tuple[bytes, int]:
    """A v2 inference request for one engine-ready image, its tensor in binary after the JSON header:
    ``(body, header length)`` (the header length travels as Inference-Header-Content-Length)."""
    raw = np.ascontiguousarray(row, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    header = json.dumps({"inputs": [{"name": name, "datatype": V2_DATATYPES[dtype], "shape": list(row.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, len(header)


def parse_hey(text: str) -> Dict:
    """hey's summary: requests/s, latency percentiles (ms) and answers by status code."""
    def seconds(pattern: str) -> float:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else float("nan")

    statuses = {code: int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    _, _, failures = text.partition("Error distribution:")  # requests that got no answer at all
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\s", failures, re.M))
    return {"requests_per_s": seconds(r"Requests/sec:\s+([0-9.]+)"),
            "p50_ms": 1000 * seconds(r"50%+ in ([0-9.]+) secs"), "p90_ms": 1000 * seconds(r"90%+ in ([0-9.]+) secs"),
            "p99_ms": 1000 * seconds(r"99%+ in ([0-9.]+) secs"), "statuses": statuses,
            "non_2xx": sum(n for code, n in statuses.items() if not code.startswith("2")) + errors}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``cskd serve PACKAGE`` on a free loopback port, HTTP only, for as long as the ``with`` lasts."""

    def __init__(self, folder: Path, options: ServedOptions, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cskd", "serve", str(folder), "--port", str(self.port), "--grpc-port", "0",
                   "--log-level", "warning", *options.serve_args]
        if options.threads:
            command += ["--threads", str(options.threads)]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(options.ready_timeout_s, log_path)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise CSKDError(f"cskd serve exited with code {self.process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        raise CSKDError(f"cskd serve was not ready within {timeout_s:g} s; its log: {log_path}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_hey(url: str, body: Path, header_length: int, concurrency: int, seconds: float) -> Dict:
    command = ["hey", "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST", "-T", "application/octet-stream",
               "-H", f"Inference-Header-Content-Length: {header_length}", "-D", str(body), url]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise CSKDError(f"hey did not finish {seconds:g} s of load within a minute more; is the server stuck?") from None
    if done.returncode != 0:
        raise CSKDError(f"hey failed ({done.returncode}): {done.stderr[-500:]}")
    return parse_hey(done.stdout)


def measure_served(models: List[ServedModel], options: ServedOptions, progress=None) -> None:
    """Serve every model at once, then drive each with hey at every concurrency, interleaved per round."""
    check_served_tools()
    with tempfile.TemporaryDirectory(prefix="cskd-served-") as scratch:
        folder = Path(scratch)
        servers: List[Server] = []
        try:
            targets = []
            for i, model in enumerate(models):
                server = Server(model.folder, options, folder / f"server{i}.log")
                servers.append(server)
                body, header_length = v2_binary_request(model.package.input.name, model.row, model.package.input.dtype)
                (folder / f"body{i}").write_bytes(body)
                targets.append((f"{server.url}/v2/models/{model.package.name}/infer", folder / f"body{i}", header_length))
            for model, (url, body, length) in zip(models, targets):  # warm-up: first requests and kernels
                run_hey(url, body, length, max(options.concurrency), 1.0)
            for _ in range(options.rounds):
                for concurrency in options.concurrency:
                    for model, (url, body, length) in zip(models, targets):
                        model.runs.setdefault(concurrency, []).append(run_hey(url, body, length, concurrency, options.seconds))
                        if progress is not None:
                            progress.update(1)
        finally:
            for server in servers:
                server.close()


def served_rows(models: List[ServedModel], engine_rows: List[Dict]) -> List[Dict]:
    """Per model and concurrency: median figures over rounds, the served speedup over the served
    teacher and the engine speedup it is compared with (``engine_rows``: the engine benchmark's rows)."""
    teacher = next(m for m in models if m.role == "teacher")
    batches = sorted({r["batch"] for r in engine_rows})
    rows = []
    for model in models:
        for concurrency, runs in sorted(model.runs.items()):
            summary = {key: float(np.median([run[key] for run in runs])) for key in ("requests_per_s", "p50_ms", "p99_ms")}
            mine = {key: float(np.median([run[key] for run in teacher.runs[concurrency]])) for key in ("requests_per_s", "p50_ms")}
            served = mine["p50_ms"] / summary["p50_ms"] if concurrency == 1 else summary["requests_per_s"] / mine["requests_per_s"]
            batch = max([b for b in batches if b <= concurrency] or batches[:1])
            engine = next(r["speedup_vs_teacher"] for r in engine_rows if r["model"] == model.label and r["batch"] == batch)
            rows.append({"model": model.label, "role": model.role, "folder": str(model.folder), "concurrency": concurrency, **summary,
                         "non_2xx": sum(run["non_2xx"] for run in runs), "served_speedup": served,
                         "engine_batch": batch, "engine_speedup": engine, "served_of_engine": served / engine})
    return rows


def format_served(rows: List[Dict]) -> str:
    lines = [f"{'served model':<34} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'non-2xx':>7} "
             f"{'served x':>8} {'engine x':>11} {'kept':>5}"]
    for r in rows:
        lines.append(f"{r['model']:<34} {r['concurrency']:>4} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['requests_per_s']:>8.0f} "
                     f"{r['non_2xx']:>7} {r['served_speedup']:>7.2f}x {r['engine_speedup']:>6.2f}x (b{r['engine_batch']}) "
                     f"{100 * r['served_of_engine']:>4.0f}%")
    return "\n".join(lines)
