"""cskd bench --served: hey's summary read right, the request it sends is what the server parses, and a
real run serves every package, loads it and reports served against engine speedups (and gates them)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import cskd.measure.bench
from cskd.checkpoint import save_weights
from cskd.cli import main
from cskd.config import load_config
from cskd.data.datasets import build_dataset
from cskd.errors import CSKDError
from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.bench import run_bench
from cskd.measure.served import ServedOptions, parse_hey, v2_binary_request
from cskd.run import RunDir
from cskd.serve.v2_protocol import parse_request
from cskd.tasks import get_task
from tests.test_measure_bench import packages, quick  # noqa: F401  (the module's exported teacher and student)

# hey 0.1.4's output (Debian's hey), trimmed of its histogram: 30 answers, 2 refused, 3 never answered
HEY_OUTPUT = """
Summary:
  Total:\t0.0944 secs
  Requests/sec:\t317.7553

Latency distribution:
  10% in 0.0046 secs
  25% in 0.0059 secs
  50% in 0.0060 secs
  75% in 0.0075 secs
  90% in 0.0081 secs
  95% in 0.0088 secs
  99% in 0.0121 secs

Status code distribution:
  [200]\t30 responses
  [503]\t2 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:1/v2/models/m/infer": dial tcp 127.0.0.1:1: connect: connection refused
"""


def test_parse_hey_reads_throughput_percentiles_and_failures():
    parsed = parse_hey(HEY_OUTPUT)
    assert parsed["requests_per_s"] == pytest.approx(317.7553)
    assert (parsed["p50_ms"], parsed["p90_ms"], parsed["p99_ms"]) == pytest.approx((6.0, 8.1, 12.1))
    assert parsed["statuses"] == {"200": 30, "503": 2} and parsed["non_2xx"] == 5  # 2 refused + 3 unanswered


def test_the_request_hey_sends_is_one_image_the_server_parses_back():
    row = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    body, header_length = v2_binary_request("input", row, "float32")
    parsed = parse_request(body, str(header_length))
    assert parsed.inputs[0].shape == [1, 1, 32, 32] and np.array_equal(parsed.inputs[0].array, row)
    assert parsed.wants_binary("logits") and [name for name, _ in parsed.outputs] == ["logits"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("hey") is None, reason="cskd bench --served drives servers with hey (apt-get install hey)")
def test_served_bench_serves_every_package_and_reports_served_against_engine_speedups(packages, tmp_path):  # noqa: F811
    student, teacher = packages
    served = ServedOptions(concurrency=(1, 4), seconds=3.0)  # hey prints a p99 from 100 answers on
    options = quick(tmp_path, expect_speedup=1000.0, served=served)
    result = run_bench([student], teacher, options)
    rows = {(r["role"], r["concurrency"]): r for r in result["served"]}
    assert set(rows) == {("teacher", 1), ("teacher", 4), ("student", 1), ("student", 4)}
    for row in rows.values():
        assert row["non_2xx"] == 0 and row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert rows["teacher", 1]["served_speedup"] == pytest.approx(1.0)
    student_c1 = rows["student", 1]
    assert student_c1["served_speedup"] == pytest.approx(rows["teacher", 1]["p50_ms"] / student_c1["p50_ms"])
    engine = next(r for r in result["rows"] if r["role"] == "student" and r["batch"] == 1)
    assert student_c1["engine_batch"] == 1 and student_c1["engine_speedup"] == engine["speedup_vs_teacher"]
    assert rows["student", 4]["engine_batch"] == 4  # the largest benchmarked batch not above the concurrency
    assert any("served at concurrency 1" in f for f in result["failures"])  # the gate reads the served figures too
    assert (tmp_path / "served.png").stat().st_size > 5000 and str(tmp_path / "served.png") in result["plots"]


def test_failed_served_requests_fail_the_bench_whatever_the_speedup():
    from cskd.measure.bench import BenchOptions, check_gates

    engine = [{"model": m, "role": r, "batch": 1, "speedup_vs_teacher": x, "top1": None} for m, r, x in (("T", "teacher", 1.0),
                                                                                                         ("S", "student", 5.0))]
    served = [{"model": "T", "role": "teacher", "concurrency": 1, "served_speedup": 1.0, "non_2xx": 0},
              {"model": "S", "role": "student", "concurrency": 1, "served_speedup": 50.0, "non_2xx": 7}]  # fast because failing
    failures = check_gates({"rows": engine, "served": served}, BenchOptions(expect_speedup=2.0))
    assert failures == ["S served at concurrency 1 gave 7 non-2xx answers or failed requests; see its server log"]


def fake_hey(tmp_path, monkeypatch) -> None:
    """A hey on PATH that the served stage finds (and never gets to run)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "hey").write_text("#!/bin/sh\nexit 1\n")
    (tools / "hey").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")


def untrained_run(path) -> None:
    """A tiny student's run directory (config and initial weights): what cskd bench exports before timing."""
    cfg = load_config(None, ["student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", f"output={path}"])
    task = get_task("student")
    _, info = build_dataset(cfg.data.name, "val")
    spec = task.spec(cfg, info)
    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.save_config(cfg)
    save_weights(run.best, task.weights(task.build(spec)), spec, {"epoch": 0})


def test_cskd_bench_served_without_hey_is_refused_before_exporting_or_timing(tmp_path, monkeypatch, capsys):
    untrained_run(tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    code = main(["bench", str(tmp_path / "run"), "--teacher", str(tmp_path / "run"), "--served", "--out", str(tmp_path / "bench")])
    assert code != 0 and "hey is not on PATH: install it (apt-get install hey" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before and not (tmp_path / "bench").exists()  # no export


def test_a_served_stage_that_fails_keeps_the_engine_figures_in_bench_json(tmp_path, monkeypatch):
    untrained_run(tmp_path / "run")  # two packages of one tiny network: what is timed does not matter here
    student, teacher = (export_model(tmp_path / "run", ExportOptions(out=tmp_path / name, gate=False, parity_images=16),
                                     log=lambda _: None)[0] for name in ("student", "teacher"))
    fake_hey(tmp_path, monkeypatch)

    def server_dies(*args, **kwargs):
        raise CSKDError("cskd serve exited with code 1")

    monkeypatch.setattr(cskd.measure.bench, "measure_served", server_dies)
    seen = []
    with pytest.raises(CSKDError, match="cskd serve exited"):
        run_bench([student], teacher, quick(tmp_path / "out", served=ServedOptions(concurrency=(1,), seconds=1.0)),
                  on_engine=lambda result: seen.append(len(result["rows"])))
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert seen == [4] and len(saved["rows"]) == 4 and "served" not in saved  # teacher and student at batch 1 and 4
    assert all(r["p50_ms"] > 0 for r in saved["rows"])
