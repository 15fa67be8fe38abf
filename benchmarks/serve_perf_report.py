"""Table and JSON of a serve_perf_analyzer.sh run: served latency and throughput per package, protocol
and concurrency, and each package's served speedup over the first one (the teacher).

    python benchmarks/serve_perf_report.py OUT TEACHER_LABEL STUDENT_LABEL...

Speedup at concurrency 1 is the p50 latency ratio, above it the throughput ratio. perf_analyzer stops
at the first failed request, so a finished run had no non-2xx answer (and no gRPC error).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict


def read_run(path: Path) -> Dict[str, float]:
    with path.open() as f:
        row = next(csv.DictReader(f))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}


def collect(out: Path, labels: list[str]) -> Dict:
    runs: Dict = {}
    for label in labels:
        for path in sorted(out.glob(f"{label}.*.c*.csv")):
            protocol, level = path.name[len(label) + 1 :].split(".")[:2]
            runs.setdefault(label, {}).setdefault(protocol, {})[int(level[1:])] = read_run(path)
    return runs


def report(out: Path, labels: list[str]) -> Dict:
    runs = collect(out, labels)
    teacher = labels[0]
    print(f"{'package':<28} {'proto':>5} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'infer/s':>8} {'speedup':>8}")
    for label in labels:
        for protocol, levels in runs.get(label, {}).items():
            for level, r in sorted(levels.items()):
                base = runs[teacher][protocol][level]
                r["speedup"] = base["p50_ms"] / r["p50_ms"] if level == 1 else r["throughput"] / base["throughput"]
                print(f"{label:<28} {protocol:>5} {level:>4} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['throughput']:>8.0f} "
                      f"{r['speedup']:>7.2f}x")
    (out / "perf_analyzer.json").write_text(json.dumps({"teacher": teacher, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out / 'perf_analyzer.json'}")
    return runs


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    report(Path(sys.argv[1]), sys.argv[2:])
