"""How one server's cores are shared between its models: each model's engine on every core (the default)
against each on its share, with one model loaded and with both loaded at once.

    python benchmarks/serve_models_split.py --packages runs/demo/export-onnx-fp32 runs/demo/export-teacher-onnx-fp32 \\
        --out runs/models-split

Two servers, each serving both packages: one with onnxruntime's default threads (every core per
model), one with `--threads 1` (a core per model on this 2-core machine). hey (compiled: the client
does not take the cores a Python client would) posts one v2 binary tensor per request at
--concurrency, for --seconds, to one model alone, then to both at once (two hey processes), settings
interleaved round by round; median throughput per model. Writes OUT/models_split.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Dict, List

import numpy as np

from cskd.measure.served import ServedOptions, Server, parse_hey, v2_binary_request
from cskd.runtime.package import read_package


def hey(url: str, model: str, body: Path, header_length: int, concurrency: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["hey", "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST", "-T", "application/octet-stream",
                             "-H", f"Inference-Header-Content-Length: {header_length}", "-D", str(body),
                             f"{url}/v2/models/{model}/infer"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, nargs=2, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("models-split"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names, bodies = [], []
    for i, folder in enumerate(args.packages):
        package = read_package(folder)
        spec = package.input
        row = np.zeros((1, spec.channels, spec.size, spec.size), np.uint8 if spec.dtype == "uint8" else np.float32)
        body, length = v2_binary_request(spec.name, row, spec.dtype)
        (args.out / f"body{i}").write_bytes(body)
        names.append(package.name)
        bodies.append((args.out / f"body{i}", length))
    settings = {"every core per model": [], "a core per model": ["--threads", "1"]}
    servers: Dict[str, Server] = {}
    results: Dict[str, Dict[str, List[float]]] = {s: {} for s in settings}
    try:
        for label, extra in settings.items():
            servers[label] = Server(args.packages[0], ServedOptions(serve_args=[str(args.packages[1]), *extra]),
                                    args.out / f"{label.replace(' ', '-')}.server.log")
        for _ in range(args.rounds):
            for label, server in servers.items():
                for loaded in ([0], [1], [0, 1]):
                    procs = [(i, hey(server.url, names[i], *bodies[i], args.concurrency, args.seconds)) for i in loaded]
                    for i, proc in procs:
                        figures = parse_hey(proc.communicate()[0])
                        if figures["non_2xx"]:
                            raise SystemExit(f"{label}: {names[i]} answered {figures['statuses']}")
                        key = f"{names[i]} ({'alone' if len(loaded) == 1 else 'both loaded'})"
                        results[label].setdefault(key, []).append(figures["requests_per_s"])
                    print(label, loaded, {k: round(v[-1]) for k, v in results[label].items()}, flush=True)
    finally:
        for server in servers.values():
            server.close()
    table = {label: {key: statistics.median(values) for key, values in by_key.items()} for label, by_key in results.items()}
    keys = list(next(iter(table.values())))
    print(f"{'requests/s (median of ' + str(args.rounds) + ')':<44}" + "".join(f"{label:>24}" for label in table))
    for key in keys:
        print(f"{key:<44}" + "".join(f"{table[label][key]:>24.0f}" for label in table))
    (args.out / "models_split.json").write_text(json.dumps({"median_requests_per_s": table, "runs": results,
                                                            "concurrency": args.concurrency, "seconds": args.seconds}, indent=2))


if __name__ == "__main__":
    main()
