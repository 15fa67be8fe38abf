"""What the shadow teacher costs the served student: perf_analyzer against the same student package
served with the shadow off and at several rates, in one interleaved run.

    python benchmarks/shadow_cost.py --student runs/demo/export-onnx-fp32 --teacher runs/demo/export-teacher-onnx-fp32 \\
        --out runs/shadow-cost

One `cskd serve` per setting (the same package and flags, `--shadow TEACHER --shadow-rate R` added;
rate 0: no shadow), all up at once; perf_analyzer (KServe v2 over HTTP, binary tensors, one image
per request, zero inputs) drives one at a time, the settings rotated each round, at each
concurrency. Before each run the previous servers' shadow queues are waited empty, so no teacher
backlog runs during another setting's measurement. Per setting: the median over rounds of the p50
latency at concurrency 1 and of the throughput above it, their ratio to the shadow off, and the
shadow's samples by outcome during the runs (drops: what the teacher could not keep up with). At the
end each server classifies the same real images, checked against the package's engine offline.

``--busy N`` keeps N other processes spinning at normal priority through the measurements (both
cores busy with other work, as on a shared machine): what an idle-class shadow must not turn into the
student's tail latency (p99 is reported beside p50).

    python benchmarks/shadow_cost.py --student S --teacher T --rates 0 1 --concurrency 1 --busy 2 --out runs/shadow-busy

Writes OUT/shadow_cost.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx
import numpy as np
import perf_analyzer_client  # benchmarks/, beside this script
from PIL import Image

from cskd.measure.served import ServedOptions, Server
from cskd.runtime.backends import create_backend
from cskd.runtime.package import read_package
from cskd.runtime.preprocess import resize_and_crop, to_engine_input


def shadow_samples(url: str) -> Dict[str, int]:
    response = httpx.get(url + "/v1/shadow", timeout=30)
    return response.json()["samples"] if response.status_code == 200 else {}


def drain(servers: Dict[float, Server], timeout_s: float = 600.0) -> None:
    """Wait until no server's shadow teacher has samples queued (its backlog would load the machine)."""
    deadline = time.time() + timeout_s
    for rate, server in servers.items():
        while rate and time.time() < deadline and httpx.get(server.url + "/v1/shadow", timeout=30).json()["queued"]:
            time.sleep(0.2)


def answers_are_the_engines(server: Server, package_dir: Path, model: str, count: int = 32) -> bool:
    """The server's v2 logits for ``count`` validation images equal the package's engine offline."""
    from cskd.data.datasets import demo_arrays

    backend, package = create_backend(package_dir)
    spec = package.input
    images, _ = demo_arrays("val")
    pixels = np.stack([np.asarray(resize_and_crop(Image.fromarray(image), spec.size, spec.resize, spec.crop_pct))[None]
                       for image in images[:count]])  # as the server decodes an image for this package
    rows = to_engine_input(pixels, spec.dtype, spec.mean, spec.std)
    body = {"inputs": [{"name": spec.name, "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}],
            "outputs": [{"name": "logits"}]}
    answer = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=60).json()
    if "outputs" not in answer:
        raise SystemExit(f"the server refused the check's {count} images: {answer}")
    served = answer["outputs"][0]["data"]
    return bool(np.allclose(np.array(served).reshape(count, -1), backend.infer(rows), atol=1e-4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.1, 1.0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement interval")
    parser.add_argument("--busy", type=int, default=0, help="other processes kept spinning at normal priority meanwhile")
    parser.add_argument("--serve-args", default="", help="further cskd serve flags for every server")
    parser.add_argument("--out", type=Path, default=Path("shadow-cost"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tools = perf_analyzer_client.install()
    model = read_package(args.student).name
    servers: Dict[float, Server] = {}
    correct: Dict[float, bool] = {}
    runs: Dict[float, Dict[int, List[Dict]]] = {rate: {c: [] for c in args.concurrency} for rate in args.rates}
    burners: List[subprocess.Popen] = []
    try:
        for rate in args.rates:
            shadow = ["--shadow", str(args.teacher), "--shadow-rate", str(rate)] if rate else []
            servers[rate] = Server(args.student, ServedOptions(serve_args=[*shadow, *args.serve_args.split()]),
                                   args.out / f"rate-{rate:g}.server.log")
        for rate, server in servers.items():  # warm-up: load only, its figures (and their stability) unused
            perf_analyzer_client.measure(tools, server.url.removeprefix("http://"), model, 1, 1000, args.out / "warmup.csv", check=False)
        burners += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                order = args.rates[round_ % len(args.rates):] + args.rates[: round_ % len(args.rates)]
                for rate in order:
                    drain(servers)
                    before = shadow_samples(servers[rate].url)
                    address = servers[rate].url.removeprefix("http://")
                    figures = perf_analyzer_client.measure(tools, address, model, concurrency, args.window_ms,
                                                           args.out / f"rate-{rate:g}.c{concurrency}.r{round_}.csv")
                    after = shadow_samples(servers[rate].url)
                    figures["samples"] = {k: after[k] - before.get(k, 0) for k in after}
                    runs[rate][concurrency].append(figures)
                    print(f"round {round_} c{concurrency} rate {rate:g}: p50 {figures['p50_ms']:.3f} ms, "
                          f"p99 {figures['p99_ms']:.3f} ms, "
                          f"{figures['throughput']:.0f} infer/s, shadow {figures['samples']}", flush=True)
        for burner in burners:
            burner.kill()
        drain(servers)
        correct.update({rate: answers_are_the_engines(server, args.student, model) for rate, server in servers.items()})
    finally:
        for burner in burners:
            burner.kill()
        for server in servers.values():
            server.close()
        if all(runs[rate][c] for rate in args.rates for c in args.concurrency):
            report(runs, correct, args)  # the measurements are kept even if the check failed


def report(runs: Dict[float, Dict[int, List[Dict]]], correct: Dict[float, bool], args) -> None:
    base = args.rates[0]
    table, lines = [], []
    header = (f"{'shadow rate':>11} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'infer/s':>8} {'vs off':>8} {'p99 vs off':>10} "
              f"{'sampled':>8} {'dropped':>8}")
    lines.append(header)
    for rate in args.rates:
        for concurrency in args.concurrency:
            done = runs[rate][concurrency]
            p50 = statistics.median(r["p50_ms"] for r in done)
            p99 = statistics.median(r["p99_ms"] for r in done)
            throughput = statistics.median(r["throughput"] for r in done)
            # Each round's ratio to the shadow off in the same round, then their median: the machine's speed
            # drifts over a run by more than the effect (c16 throughput fell ~30% from the first round to the
            # last for every setting alike), and a ratio of medians would mix rounds.
            ref = runs[base][concurrency]
            if concurrency == 1:  # latency: above 1 is slower
                ratio = statistics.median(r["p50_ms"] / b["p50_ms"] for r, b in zip(done, ref))
            else:  # throughput: below 1 is slower
                ratio = statistics.median(r["throughput"] / b["throughput"] for r, b in zip(done, ref))
            p99_ratio = statistics.median(r["p99_ms"] / b["p99_ms"] for r, b in zip(done, ref))
            sampled = sum(sum(r["samples"].values()) for r in done)
            dropped = sum(r["samples"].get("dropped", 0) for r in done)
            table.append({"rate": rate, "concurrency": concurrency, "p50_ms": p50, "p99_ms": p99, "throughput": throughput,
                          "ratio_vs_off": ratio, "p99_ratio_vs_off": p99_ratio,
                          "sampled": sampled, "dropped": dropped, "runs": done, "answers_correct": correct.get(rate)})
            lines.append(f"{rate:>11g} {concurrency:>4} {p50:>8.3f} {p99:>8.3f} {throughput:>8.0f} {ratio:>7.3f}x {p99_ratio:>9.3f}x "
                         f"{sampled:>8} {dropped:>8}")
    lines.append("vs off: median over rounds of the ratio to the shadow off in the same round: p50 at concurrency 1 "
                 "(above 1: slower), throughput above it (below 1: slower); "
                 f"answers equal to the engine's: {all(correct.values()) if correct else 'not checked'}")
    (args.out / "shadow_cost.json").write_text(json.dumps({"rows": table, "student": str(args.student),
                                                           "teacher": str(args.teacher), "rounds": args.rounds,
                                                           "busy": args.busy}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
