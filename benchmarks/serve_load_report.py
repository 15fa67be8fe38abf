"""Helper of serve_load.sh: request bodies, snapshots of a server process, and the report.

    python benchmarks/serve_load_report.py --make-bodies OUT          # OUT/image.png, OUT/multipart.body
    python benchmarks/serve_load_report.py --snapshot PID URL          # CPU seconds, RSS, /metrics (JSON)
    python benchmarks/serve_load_report.py --report OUT NAME... --model DIR   # table + OUT/serve_load.json

CPU outside inference per request = (server CPU seconds - inference CPU seconds) / requests, where
inference CPU is the backend's wall time from the server's own metrics times the CPU it keeps busy
during a call (measured here: ``cpu_per_wall``, onnxruntime's threads at the same batch sizes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import urllib.request
from pathlib import Path


def make_bodies(out: Path) -> None:
    from PIL import Image

    from cskd.assets import demo_arrays

    buf = io.BytesIO()
    Image.fromarray(demo_arrays("val")[0][0], mode="L").save(buf, format="PNG")
    png = buf.getvalue()
    (out / "image.png").write_bytes(png)
    part = (b'--cskdloadboundary\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--cskdloadboundary--\r\n")
    (out / "multipart.body").write_bytes(part)


def snapshot(pid: int, url: str) -> dict:
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime of the whole process
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = {}
    for name in ("cskd_inference_duration_seconds_sum", "cskd_inference_duration_seconds_count",
                 "cskd_batch_size_images_sum", "cskd_batch_size_images_count", "cskd_images_total"):
        # every model's series summed (one model here); labelled series print as name{model="..."} value
        values[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M))
    return {"cpu_s": cpu, "rss_kb": rss, **values}


def cpu_per_wall(backend, spec, batch: int, seconds: float = 3.0) -> float:
    """CPU seconds ``backend`` keeps busy per second of a call at ``batch`` (its threads), measured on
    the now idle machine with the serving backend's own defaults."""
    import time

    import numpy as np

    from cskd.runtime.preprocess import to_engine_input

    images = to_engine_input(np.zeros((batch, spec.channels, spec.size, spec.size), np.uint8), spec.dtype, spec.mean, spec.std)
    for _ in range(10):
        backend.infer(images)
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        backend.infer(images)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def report(out: Path, names: list, model: Path) -> None:
    from cskd.measure.served import parse_hey
    from cskd.runtime.backends import create_backend

    backend, package = create_backend(model)
    rows = {}
    for name in names:
        before, after = (json.loads((out / f"{name}.{when}.json").read_text()) for when in ("before", "after"))
        hey = parse_hey((out / f"{name}.hey.txt").read_text())
        requests = sum(hey["statuses"].values())
        delta = {k: after[k] - before[k] for k in before if k != "rss_kb"}
        calls = delta["cskd_batch_size_images_count"] or 1
        rows[name] = {**hey, "requests": requests, "server_cpu_ms_per_request": 1000 * delta["cpu_s"] / requests,
                      "inference_wall_ms_per_request": 1000 * delta["cskd_inference_duration_seconds_sum"] / requests,
                      "mean_batch": delta["cskd_batch_size_images_sum"] / calls,
                      "rss_kb": [before["rss_kb"], after["rss_kb"]]}
        r = rows[name]
        r["inference_cpu_per_wall"] = cpu_per_wall(backend, package.input, max(1, round(r["mean_batch"])))
        r["cpu_outside_inference_ms_per_request"] = (r["server_cpu_ms_per_request"]
                                                     - r["inference_wall_ms_per_request"] * r["inference_cpu_per_wall"])
    first = rows[names[0]]["requests_per_s"]
    print(f"{'setting':<9} {'req/s':>8} {'x':>6} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} {'batch':>6} "
          f"{'CPU ms/req':>10} {'infer ms/req':>12} {'outside ms/req':>14}")
    for name, r in rows.items():
        r["speedup"] = r["requests_per_s"] / first
        print(f"{name:<9} {r['requests_per_s']:>8.1f} {r['speedup']:>5.2f}x {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['non_2xx']:>7} {r['mean_batch']:>6.1f} {r['server_cpu_ms_per_request']:>10.2f} "
              f"{r['inference_wall_ms_per_request']:>12.2f} {r['cpu_outside_inference_ms_per_request']:>14.2f}")
    (out / "serve_load.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out / 'serve_load.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-bodies", type=Path)
    parser.add_argument("--snapshot", nargs=2, metavar=("PID", "URL"))
    parser.add_argument("--report", nargs="+", metavar=("OUT", "NAME"))
    parser.add_argument("--model", type=Path, help="--report: the package served (to measure its CPU per call)")
    args = parser.parse_args()
    if args.make_bodies:
        make_bodies(args.make_bodies)
    elif args.snapshot:
        print(json.dumps(snapshot(int(args.snapshot[0]), args.snapshot[1])))
    elif args.report:
        if args.model is None:
            parser.error("--report needs --model DIR (the package that was served)")
        report(Path(args.report[0]), args.report[1:], args.model)
    else:
        parser.error("give --make-bodies, --snapshot or --report")
        sys.exit(2)


if __name__ == "__main__":
    main()
