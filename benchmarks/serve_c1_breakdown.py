"""Where a concurrency-1 request's time goes: the engine alone, the engine inside `cskd serve`, the
server's whole handling, and what the client sees, for each package and onnxruntime thread count.

    python benchmarks/serve_c1_breakdown.py --packages runs/demo/export-onnx-fp32 runs/demo/export-onnx-int8 \\
        --threads 0 1 --out runs/c1

For every (package, threads) one `cskd serve --threads T` (0: onnxruntime's default, all cores); in
rounds, settings interleaved: the engine alone in this process (the same package, threads and
no-spin options as the server, batch 1, back-to-back calls: what `cskd bench` times), then
perf_analyzer at concurrency 1 (KServe v2 HTTP, binary tensor, zero input) against the server, with
the server's own Prometheus histograms read before and after: the mean time of its backend calls
(`cskd_inference_duration_seconds`) and of its handling of each request, from the first byte the
app sees to the last it sends (`cskd_http_request_duration_seconds`). The rest of the client's p50
is uvicorn, the loopback and perf_analyzer itself. Medians over rounds; OUT/c1_breakdown.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Dict, List

import httpx
import numpy as np
import perf_analyzer_client  # benchmarks/, beside this script

from cskd.measure.served import ServedOptions, Server
from cskd.runtime.backends import BackendOptions, create_backend
from cskd.runtime.package import read_package


def histogram_totals(url: str) -> Dict[str, float]:
    """Sum and count of the inference and (inference route) request histograms."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for key, pattern in {"infer_sum": r'^cskd_inference_duration_seconds_sum\{[^}]*\} (\S+)$',
                         "infer_count": r'^cskd_inference_duration_seconds_count\{[^}]*\} (\S+)$',
                         "request_sum": r'^cskd_http_request_duration_seconds_sum\{route="/v2/models/\{name\}/infer"\} (\S+)$',
                         "request_count": r'^cskd_http_request_duration_seconds_count\{route="/v2/models/\{name\}/infer"\} (\S+)$'}.items():
        values[key] = sum(float(v) for v in re.findall(pattern, text, re.M))
    return values


def engine_alone(folder: Path, threads: int, seconds: float = 3.0) -> float:
    """p50 ms of back-to-back batch-1 calls of the package's engine in this process, as the server builds it."""
    backend, package = create_backend(folder, None, BackendOptions(threads=threads or None, spin=False))
    spec = package.input
    row = np.zeros((1, spec.channels, spec.size, spec.size), np.uint8 if spec.dtype == "uint8" else np.float32)
    for _ in range(20):
        backend.infer(row)
    times: List[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        backend.infer(row)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, nargs="+", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="onnxruntime threads (0: its default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--serve-args", default="", help="further cskd serve flags for every server")
    parser.add_argument("--out", type=Path, default=Path("c1-breakdown"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tools = perf_analyzer_client.install()
    settings = [(p, t) for p in args.packages for t in args.threads]
    servers: Dict[tuple, Server] = {}
    figures: Dict[tuple, List[Dict[str, float]]] = {s: [] for s in settings}
    try:
        for package, threads in settings:
            extra = (["--threads", str(threads)] if threads else []) + args.serve_args.split()
            servers[(package, threads)] = Server(package, ServedOptions(serve_args=extra),
                                                 args.out / f"{package.name}-t{threads}.server.log")
        for round_ in range(args.rounds):
            for setting in settings[round_ % len(settings):] + settings[: round_ % len(settings)]:
                package, threads = setting
                server, model = servers[setting], read_package(package).name
                engine = engine_alone(package, threads)
                before = histogram_totals(server.url)
                client = perf_analyzer_client.measure(tools, server.url.removeprefix("http://"), model, 1, args.window_ms,
                                                      args.out / f"{package.name}-t{threads}.r{round_}.csv")["p50_ms"]
                after = histogram_totals(server.url)
                calls = after["infer_count"] - before["infer_count"]
                requests = after["request_count"] - before["request_count"]
                row = {"engine_ms": engine, "client_p50_ms": client,
                       "in_server_engine_ms": 1000 * (after["infer_sum"] - before["infer_sum"]) / calls,
                       "server_handling_ms": 1000 * (after["request_sum"] - before["request_sum"]) / requests}
                figures[setting].append(row)
                print(f"round {round_} {package.name} threads {threads or 'default'}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    finally:
        for server in servers.values():
            server.close()
    rows = []
    print(f"{'package':<22} {'threads':>7} {'engine':>8} {'in server':>9} {'handling':>9} {'client p50':>10} {'kept':>6}")
    for (package, threads), runs in figures.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"package": str(package), "threads": threads or "default", **med, "runs": runs})
        print(f"{package.name:<22} {threads or 'default':>7} {med['engine_ms']:>8.3f} {med['in_server_engine_ms']:>9.3f} "
              f"{med['server_handling_ms']:>9.3f} {med['client_p50_ms']:>10.3f} {med['engine_ms'] / med['client_p50_ms']:>6.0%}")
    print("engine: batch-1 calls back to back in one process; in server: the same engine's calls inside cskd serve under "
          "perf_analyzer at concurrency 1; handling: the server's time per request; kept: engine / client p50")
    (args.out / "c1_breakdown.json").write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
