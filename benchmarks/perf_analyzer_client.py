"""NVIDIA's perf_analyzer for the benchmarks: set up by perf_analyzer_install.sh, run once per measurement."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent


def install() -> Path:
    """The folder holding perf_analyzer and its lib/ (installed on first use)."""
    return Path(subprocess.run(["bash", str(HERE / "perf_analyzer_install.sh")], capture_output=True, text=True,
                               check=True).stdout.strip())


def measure(tools: Path, url: str, model: str, concurrency: int, window_ms: int, csv_path: Path,
            check: bool = True) -> Dict[str, float]:
    """KServe v2 over HTTP, one zero image per request: p50 and p99 (ms) and throughput (infer/s); {} when not ``check``ed."""
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tools / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    command = [str(tools / "perf_analyzer"), "-m", model, "-u", url, "-i", "http", "-b", "1", "--input-data", "zero",
               "--concurrency-range", str(concurrency), "--measurement-interval", str(window_ms),
               "--stability-percentage", "25", "--max-trials", "10", "-f", str(csv_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if not check:
        return {}
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer failed on {url}: {done.stdout[-1500:]}{done.stderr[-500:]}")
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}
