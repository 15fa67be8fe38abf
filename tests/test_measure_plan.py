"""cskd plan: FLOPs from torch's counter against hand counts, the package it times is what `cskd export`
writes, the budget filter (a deliberately slow teacher), proxy ranking and --train, and the command
end to end on two tiny candidates and the micro teacher."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cskd.measure.bench
import cskd.measure.plan as plan_module
from cskd.checkpoint import load_weights, save_weights
from cskd.cli import main
from cskd.config import load_config
from cskd.data.datasets import build_dataset
from cskd.errors import CSKDError
from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.candidates import DEMO_STUDENT, parse_candidate
from cskd.measure.plan import PlanOptions, budget_ms, plan, within_budget
from cskd.measure.training import EpochCost
from cskd.models import create_student, fuse_heads
from cskd.pairing import count_flops, count_params
from cskd.run import RunDir
from cskd.runtime.package import read_package
from cskd.tasks import get_task
from tests.test_measure_bench import slow_down

TINY = [f"{DEMO_STUDENT}:embed_dim=32,depth=1,num_heads=2", f"{DEMO_STUDENT}:embed_dim=32,depth=2,num_heads=2,patch_size=8"]


def tiny_options(tmp_path, micro_teacher, **kwargs) -> PlanOptions:
    """Two one- and two-block candidates against the micro teacher, timed briefly: seconds."""
    values = dict(overrides=micro_teacher, candidates=[parse_candidate(t) for t in TINY], rounds=1, iters=3, train_steps=1, train_rounds=1,
                  out=tmp_path / "plan", show_progress=False)
    return PlanOptions(**{**values, **kwargs})


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_of_a_linear_layer_and_a_convolution_are_two_per_multiply_add():
    assert count_flops(nn.Linear(10, 5), (10,)) == 2 * 10 * 5
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)  # 8x8 outputs of 8 channels, each 3x3x3 multiply-adds
    assert count_flops(conv, (3, 8, 8)) == 2 * (8 * 8 * 8) * (3 * 3 * 3)


class Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x)


def test_attention_is_counted_on_the_cpu_kernel_too():
    heads, tokens, dim = 2, 16, 8  # QK^T and AV: 2 matmuls of tokens x tokens x dim per head
    assert count_flops(Attention(), (heads, tokens, dim)) == 2 * 2 * heads * tokens * tokens * dim


def test_a_students_flops_grow_by_one_blocks_hand_count_per_block():
    def flops(depth: int) -> int:
        return count_flops(fuse_heads(create_student(DEMO_STUDENT, 10, 32, 4, 1, depth=depth)), (1, 32, 32))

    tokens, width = 8 * 8 + 2, 96  # 64 patches, class and distillation tokens; the demo's width
    per_block = 2 * tokens * (3 * width * width + width * width + 2 * 4 * width * width) + 4 * tokens * tokens * width
    one, two, four = flops(1), flops(2), flops(4)
    assert two - one == per_block and four - two == 2 * per_block  # qkv, projection, MLP and attention matmuls


# ---------------------------------------------------------------------------------------------
# The budget


def test_the_budget_is_the_tighter_of_the_latency_and_the_speedup():
    both = PlanOptions(max_latency_ms=2.0, min_speedup=4.0)
    assert within_budget(1.5, 10.0, both) and not within_budget(2.1, 10.0, both) and not within_budget(1.5, 4.0, both)
    assert budget_ms(10.0, both) == 2.0 and budget_ms(4.0, both) == 1.0
    assert within_budget(100.0, 1.0, PlanOptions()) and budget_ms(1.0, PlanOptions()) is None  # no budget: all count


@pytest.fixture(scope="module")
def slow_teacher_plan(micro_teacher, tmp_path_factory):
    """A plan whose teacher sleeps 20 ms a call: both candidates are far more than 3x faster."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        slow_down(monkeypatch, "teacher", 0.02)
        options = tiny_options(tmp_path_factory.mktemp("slow"), micro_teacher, min_speedup=3.0)
        return options, plan(options, log=lambda _: None)


def test_min_speedup_keeps_candidates_faster_than_a_slow_teacher(slow_teacher_plan):
    options, result = slow_teacher_plan
    teacher_ms = result["teacher"]["p50_ms"]["1"]
    assert teacher_ms >= 20 and result["budget"]["latency_ms"] == pytest.approx(teacher_ms / 3)
    assert all(c["within_budget"] and c["speedup"]["1"] >= 3 for c in result["candidates"])
    assert result["pick"] == max(result["candidates"], key=lambda c: c["flops"])["label"]  # no proxy: the most FLOPs


def test_min_speedup_leaves_out_candidates_made_slower_than_the_teacher(micro_teacher, tmp_path, monkeypatch):
    slow_down(monkeypatch, "student", 0.02)
    result = plan(tiny_options(tmp_path, micro_teacher, min_speedup=1.0, candidates=[parse_candidate(TINY[0])]),
                  log=lambda _: None)
    assert [c["within_budget"] for c in result["candidates"]] == [False] and result["pick"] is None


# ---------------------------------------------------------------------------------------------
# What is timed is what `cskd export` writes


def op_types(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_the_timed_package_is_what_cskd_export_writes_for_that_architecture(slow_teacher_plan, tmp_path):
    _, result = slow_teacher_plan
    planned = result["candidates"][0]
    # a trained run of the same architecture: the planned run directory with other weights (training changes
    # nothing else), exported by `cskd export RUN` with every default (parity gate on)
    tensors, spec, _ = load_weights(RunDir(planned["run_dir"]).best)
    trained = RunDir(tmp_path / "trained")
    trained.path.mkdir()
    trained.save_config(RunDir(planned["run_dir"]).config((f"output={trained.path}",)))
    torch.manual_seed(1)
    save_weights(trained.best, {k: v + 0.01 * torch.randn_like(v) for k, v in tensors.items()}, spec, {"epoch": 3})
    exported, package = export_model(trained.path, ExportOptions(), log=lambda _: None)
    timed = read_package(planned["package"])
    assert (timed.input, timed.precision, timed.engine, timed.files, timed.heads, timed.fused, timed.outputs) == \
        (package.input, package.precision, package.engine, package.files, package.heads, package.fused, package.outputs)
    for name in ("model.onnx", "model.optimized.onnx"):
        assert op_types(exported / name) == op_types(planned["package"] + "/" + name)
    assert timed.gate["enabled"] is False and package.gate["enabled"] is True  # untrained: measured, not gated


def test_int8_candidates_are_quantised_by_the_export_recipe_calibrated_on_training_images(micro_teacher, tmp_path):
    result = plan(tiny_options(tmp_path, micro_teacher, precision="int8", calib_images=32, candidates=[parse_candidate(TINY[0])]),
                  log=lambda _: None)
    package = read_package(result["candidates"][0]["package"])
    quantization = package.build["quantization"]
    assert package.precision == "int8" and quantization["calibration"] == "percentile-99.99" and quantization["attempts"] == []
    assert op_types(result["candidates"][0]["package"] + "/model.onnx")["QuantizeLinear"] > 0
    assert any("int8: calibrated on 32 training images" in note for note in result["notes"])


# ---------------------------------------------------------------------------------------------
# Proxy ranking and --train


def fake_run(cfg, start_s: float, step_s: float, val_s: float, steps_per_epoch: int) -> None:
    """The metrics rows of a run of ``cfg`` that starts in ``start_s`` and whose epochs take ``step_s`` a step
    and ``val_s`` to validate (its last epoch cut short at ``train.max_steps``), as cskd train writes them."""
    total = min(cfg.train.epochs * steps_per_epoch, cfg.train.max_steps or 1 << 30)
    RunDir(cfg.output).path.mkdir(parents=True, exist_ok=True)
    rows, clock = [], start_s
    for epoch in range(math.ceil(total / steps_per_epoch)):
        steps = min(steps_per_epoch, total - epoch * steps_per_epoch)
        rows.append({"epoch": epoch + 1, "epoch_start_s": clock, "steps": steps, "val_s": val_s,
                     "time_s": clock + steps * step_s + val_s})
        clock = rows[-1]["time_s"]
    (RunDir(cfg.output).path / RunDir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_proxies_train_in_equal_time_as_step_budgets_rank_the_candidates_and_train_trains_the_best(micro_teacher, tmp_path,
                                                                                                   monkeypatch):
    calls = []
    # what each candidate's real step and validation pass cost (the plan measures them on real batches): the config's
    # student 0.1 s a step and 2 s to validate, 12 s an epoch of 100 steps; the other 0.25 s and 3 s, 28 s an epoch
    costs = {"nano-w32-d1-h2-p4": EpochCost(0.1, 2.0, 100), "nano-w32-d2-h2-p8": EpochCost(0.25, 3.0, 100)}
    timed = []
    monkeypatch.setattr(plan_module, "_epoch_costs", lambda base, info, planned, cache, device: (
        timed.append([p.label for p in planned]) or costs))

    def fake_train(cfg, show_progress=True, **kwargs):  # what a run would report, by depth: the deeper one wins
        calls.append(cfg)
        depth = cfg.student.kwargs["depth"]
        cost = costs["nano-w32-d1-h2-p4" if depth == 1 else "nano-w32-d2-h2-p8"]
        fake_run(cfg, 5.0 * depth, cost.step_s, cost.val_s, 100)  # a start of 5 s a block: left out of every figure
        return SimpleNamespace(best_top1=50.0 + depth, wall_s=99.0, run_dir=cfg.output)

    monkeypatch.setattr(plan_module, "train", fake_train)
    no_kd = ["loss.deit_type=none", "loss.cskd_type=none"]  # no teacher targets: the proxy needs no cache
    own = "student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"  # the config's own student is the first candidate
    options = tiny_options(tmp_path, micro_teacher, overrides=[*micro_teacher, *no_kd, own, "train.epochs=6"], proxy_epochs=4,
                           train=True)
    result = plan(options, log=lambda _: None)
    proxies, final = calls[:-1], calls[-1]
    assert timed == [["nano-w32-d1-h2-p4", "nano-w32-d2-h2-p8"]]  # every candidate within budget, the config's student
    # equal time: the config's student 4 epochs (48 s) as 400 steps; the other 1 epoch (28 s) and, after its 3 s
    # validation pass, 68 steps of 0.25 s: 168 steps, 2 epochs, 48 s
    assert [(c.train.max_steps, c.train.epochs) for c in proxies] == [(400, 4), (168, 2)]
    # the warm-up the same share of each one's steps (the demo's 1 epoch of 4: a quarter), the cosine over them
    assert [c.train.warmup_epochs for c in proxies] == [1.0, 0.42] and all("/proxy/" in c.output for c in proxies)
    assert result["proxy"] == {"schedule": "time", "reference": "nano-w32-d1-h2-p4", "budget_s": 48.0,
                               "timed_steps": plan_module.PROXY_TIMED_STEPS}
    assert [c["proxy_top1"] for c in result["candidates"]] == [51.0, 52.0]
    assert [(c["proxy_steps"], c["proxy_epochs"]) for c in result["candidates"]] == [(400, 4.0), (168, 1.68)]
    assert [c["proxy_train_s"] for c in result["candidates"]] == [48.0, 48.0]  # the same wall time, the starts left out
    # seconds per whole epoch from each epoch's own start; the two-block one trains 12/28 of the epochs in the same time
    assert [c["epoch_s"] for c in result["candidates"]] == [12.0, 28.0] and result["config_student"] == result["candidates"][0]["label"]
    assert [c["equal_time_epochs"] for c in result["candidates"]] == [6, 3]
    assert result["candidates"][1]["equal_time_command"].endswith("train.epochs=3")
    summary = "\n".join(plan_module.format_summary(result))
    assert "proxies: each in the time of 4 epochs of nano-w32-d1-h2-p4 (48 s" in summary and "took 1.00-1.00x" in summary
    assert "at the training time of the config's own student (6 epochs" in summary
    table = plan_module.format_plan(result).splitlines()
    assert table[0].endswith("equal-time epochs") and table[-1].split()[-6:] == ["52.00%", "(1.68", "ep)", "48", "28.0", "3"]
    assert result["pick"] == result["candidates"][1]["label"]
    assert final.train.epochs == 3 and final.train.max_steps is None  # in the own student's 6 epochs' time, whole epochs
    assert final.output.endswith(f"/train/{result['pick']}")
    assert final.student.kwargs == result["candidates"][1]["kwargs"] and final.student.patch_size == 8
    assert result["trained"]["command"].startswith("cskd train ") and "student.patch_size=8 " in result["trained"]["command"]
    assert "train.epochs=3" in result["trained"]["command"]
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["trained"]["best_top1"] == 52.0 and saved["candidates"][1]["proxy_top1"] == 52.0 and saved["complete"]


@pytest.mark.slow
def test_equal_time_proxies_train_for_real_each_within_its_step_budget(micro_teacher, tmp_path):
    small = ["data.max_train=64", "data.max_val=32", "data.workers=0", "train.batch_size=16", "loss.deit_type=none",
             "loss.cskd_type=none", "student.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]  # 4 steps an epoch
    result = plan(tiny_options(tmp_path, micro_teacher, overrides=[*micro_teacher, *small], proxy_epochs=2), log=lambda _: None)
    own, other = result["candidates"]
    assert result["proxy"]["reference"] == own["label"] == result["config_student"] and own["proxy_steps"] == 2 * 4
    for c in result["candidates"]:
        run = RunDir(tmp_path / "plan" / "proxy" / c["label"])
        assert run.config().train.max_steps == c["proxy_steps"] == sum(r["steps"] for r in run.metrics())  # the budget, kept
        assert c["step_s"] > 0 and c["val_s"] > 0 and c["proxy_train_s"] > 0 and c["epoch_s"] > 0


def test_seconds_per_epoch_are_timed_from_each_epochs_own_start_a_one_epoch_runs_too():
    # a run that took 30 s to start; epochs of 100 steps at 0.1 s and a 2 s validation pass: 12 s each; the last
    # one cut short at 50 steps by a step budget; checkpoints written between epochs (0.5 s)
    rows = [{"epoch": 1, "epoch_start_s": 30.0, "time_s": 42.0, "steps": 100, "val_s": 2.0},
            {"epoch": 2, "epoch_start_s": 42.5, "time_s": 54.5, "steps": 100, "val_s": 2.0},
            {"epoch": 3, "epoch_start_s": 55.0, "time_s": 62.0, "steps": 50, "val_s": 2.0}]
    assert plan_module.epoch_seconds(rows[:1]) == 12.0  # its own 12 s, not the 42 since the run started
    assert plan_module.epoch_seconds(rows) == 12.0 and plan_module.train_seconds(rows) == 31.0  # 250 steps: 25 s + 3 x 2 s
    assert plan_module.epoch_seconds(rows[2:], steps_per_epoch=100) == 12.0  # a cut-short epoch alone, scaled to a whole one
    # rows from before epochs recorded their start: between the first and last epoch; one such epoch cannot tell
    legacy = [{"epoch": 1, "time_s": 30.0}, {"epoch": 2, "time_s": 40.0}, {"epoch": 3, "time_s": 52.0}]
    assert plan_module.epoch_seconds(legacy) == 11.0 and plan_module.epoch_seconds(legacy[:1]) is None
    assert plan_module.epoch_seconds([]) is None and plan_module.train_seconds(legacy) is None
    assert plan_module.equal_time_epochs(24, 38.6, 13.1) == 71 and plan_module.equal_time_epochs(2, 1.0, 9.0) == 1


def test_a_same_epochs_proxy_schedule_trains_each_candidate_the_proxy_epochs(micro_teacher, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plan_module, "train", lambda cfg, **kwargs: calls.append(cfg.train.epochs) or SimpleNamespace(
        best_top1=50.0, wall_s=1.0, run_dir=cfg.output))
    monkeypatch.setattr(plan_module, "training_rates", lambda steps, batches, rounds: [[400.0], [100.0]])
    no_kd = ["loss.deit_type=none", "loss.cskd_type=none"]
    plan(tiny_options(tmp_path, micro_teacher, overrides=[*micro_teacher, *no_kd], proxy_epochs=3, proxy_schedule="epochs"),
         log=lambda _: None)
    assert calls == [3, 3]


def test_proxy_epochs_need_a_cached_teacher(micro_teacher, tmp_path):
    with pytest.raises(CSKDError, match="teacher.cache=ITS_FOLDER"):
        plan(tiny_options(tmp_path, micro_teacher, proxy_epochs=1))  # the micro teacher has no cache: it would run online
    assert not (tmp_path / "plan").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------
# The plan's folder and its candidates, before any work


@pytest.fixture
def no_exports(monkeypatch):
    """Make exporting fail loudly: a test that asserts no work was done uses it after its setup."""
    def refuse(*args, **kwargs):
        raise AssertionError("an export ran: the plan did work before refusing")

    return lambda: monkeypatch.setattr(plan_module, "export_model", refuse)


def test_a_rerun_into_a_folder_holding_a_plan_is_refused_before_any_work(micro_teacher, tmp_path, no_exports, capsys):
    options = tiny_options(tmp_path, micro_teacher, candidates=[parse_candidate(TINY[0])])
    plan(options, log=lambda _: None)
    before = (tmp_path / "plan" / "plan.json").read_text()
    no_exports()
    with pytest.raises(CSKDError) as error:
        plan(options, log=lambda _: None)
    message = str(error.value)
    assert "already holds a plan (plan.json, plan.png, plan.log, untrained, packages, bench, random-teacher-maps)" in message
    assert "pass a fresh --out, or --force" in message and "\n" not in message
    assert (tmp_path / "plan" / "plan.json").read_text() == before  # untouched
    capsys.readouterr()
    assert main(["plan", *micro_teacher, "--candidates", TINY[0], "--out", str(tmp_path / "plan")]) != 0  # the command: one line
    assert capsys.readouterr().err.strip().splitlines() == [f"cskd plan: error: {message}"]


def test_force_replaces_the_earlier_plans_outputs_and_nothing_else(micro_teacher, tmp_path):
    out = tmp_path / "plan"
    (out / "proxy" / "old").mkdir(parents=True)
    (out / "proxy" / "old" / RunDir.STATE).write_text("an earlier proxy run")  # what made a rerun stop part-way
    (out / "notes.txt").write_text("mine")
    result = plan(tiny_options(tmp_path, micro_teacher, candidates=[parse_candidate(TINY[0])], force=True), log=lambda _: None)
    assert not (out / "proxy").exists() and (out / "notes.txt").read_text() == "mine"
    assert result["complete"] and json.loads((out / "plan.json").read_text())["candidates"][0]["label"] == "nano-w32-d1-h2-p4"


def test_force_refuses_to_delete_an_input_of_the_plan(micro_teacher, tmp_path, no_exports):
    options = tiny_options(tmp_path, micro_teacher, candidates=[parse_candidate(TINY[0])])
    first = plan(options, log=lambda _: None)
    no_exports()
    with pytest.raises(CSKDError, match="--teacher .* is inside .*packages, which --force would delete"):
        plan(tiny_options(tmp_path, micro_teacher, candidates=[parse_candidate(TINY[0])], force=True,
                          teacher=first["teacher"]["package"]), log=lambda _: None)
    assert (tmp_path / "plan" / "packages" / "teacher" / "model.json").is_file()


def test_candidates_that_build_the_same_network_are_planned_once(micro_teacher, tmp_path, capsys):
    # the case: the demo student, and the same with its default width written out (one label, one folder)
    code = main(["plan", *micro_teacher, "--candidates", DEMO_STUDENT, f"{DEMO_STUDENT}:embed_dim=96", "--rounds", "1",
                 "--iters", "2", "--train-steps", "1", "--train-rounds", "1", "--no-progress", "--out", str(tmp_path / "plan")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [(c["label"], c["kwargs"]) for c in result["candidates"]] == [("nano-w96-d4-h3-p4", {})]  # the first spelling
    assert result["config_student"] == "nano-w96-d4-h3-p4"  # the demo config's own student, found by its network


def test_plan_served_without_hey_is_refused_before_any_work(micro_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(CSKDError) as error:
        plan(tiny_options(tmp_path, micro_teacher, served=True), log=lambda _: None)
    assert not (tmp_path / "plan").exists()  # nothing built, exported or timed
    assert "hey is not on PATH: install it (apt-get install hey" in str(error.value)


def test_a_stage_that_fails_keeps_what_the_earlier_ones_measured_in_plan_json(micro_teacher, tmp_path, monkeypatch):
    tools = tmp_path / "tools"  # a hey on PATH, so that the served stage starts (and then fails)
    tools.mkdir()
    (tools / "hey").write_text("#!/bin/sh\nexit 1\n")
    (tools / "hey").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")

    def server_dies(*args, **kwargs):
        raise CSKDError("cskd serve exited with code 1")

    monkeypatch.setattr(cskd.measure.bench, "measure_served", server_dies)
    with pytest.raises(CSKDError, match="cskd serve exited"):
        plan(tiny_options(tmp_path, micro_teacher, served=True), log=lambda _: None)
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["stages"] == ["built", "training step", "engine"] and not saved["complete"]
    assert [c["label"] for c in saved["candidates"]] == ["nano-w32-d1-h2-p4", "nano-w32-d2-h2-p8"]
    for c in saved["candidates"]:  # what was measured before the served stage, kept; the budget waits for it
        assert c["params"] > 0 and c["train_images_per_s"] > 0 and set(c["p50_ms"]) == {"1", "8"} and "within_budget" not in c
    assert saved["teacher"]["p50_ms"]["1"] > 0
    assert len(json.loads((tmp_path / "plan" / "bench" / "bench.json").read_text())["rows"]) == 3 * 2  # the engines too


@pytest.mark.parametrize("options, fragment", [
    (dict(backend="onnx"), "--backend onnx is not one of onnxruntime, openvino, tensorrt"),
    (dict(precision="int4"), "--precision int4 is not one of fp32, fp16, int8"),
    (dict(batch_sizes=[0, 8]), "--batch-sizes takes positive numbers"),
    (dict(min_speedup=0.0), "--min-speedup 0.0 is not a positive number"),
    (dict(proxy_epochs=-1), "--proxy-epochs -1 is below 0"),
    (dict(proxy_schedule="wall"), "--proxy-schedule wall is not one of time, epochs"),
])
def test_bad_options_are_refused_naming_the_value_and_the_allowed_set(tmp_path, options, fragment):
    with pytest.raises(CSKDError) as error:
        plan(PlanOptions(out=tmp_path / "plan", **options))
    assert fragment in str(error.value)


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_plans_two_candidates_and_writes_the_table_json_plot_and_commands(micro_teacher, tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", *micro_teacher, "--candidates", *TINY, "--max-latency-ms", "1000", "--rounds", "1", "--iters", "2",
                 "--train-steps", "1", "--train-rounds", "1", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").stat().st_size > 5000 and (out / "bench" / "bench.json").is_file()
    assert [c["label"] for c in result["candidates"]] == ["nano-w32-d1-h2-p4", "nano-w32-d2-h2-p8"]
    for c in result["candidates"]:
        assert c["label"] in printed and c["command"] in printed and c["within_budget"]
        assert c["params"] > 0 and c["flops"] > 0 and c["train_images_per_s"] > 0 and set(c["p50_ms"]) == {"1", "8"}
        # the printed overrides train this very network: same parameters as the package that was timed
        cfg = load_config(None, [*micro_teacher, *c["overrides"]])
        task = get_task("student")
        _, info = build_dataset(cfg.data.name, "val")
        assert count_params(task.deployable(task.build(task.spec(cfg, info)))) == c["params"]
    assert result["teacher"]["model"] == "cskd_resnet_micro" and result["teacher"]["flops"] > result["candidates"][0]["flops"]
    assert "train img/s" in printed and "2 of 2 candidates within budget" in printed and "wrote" in printed


def test_cli_refuses_an_override_after_candidates_with_a_fix(capsys):
    assert main(["plan", "--candidates", TINY[0], "train.epochs=3"]) == 2
    assert "put config overrides before --candidates" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# benchmarks/plan_frontier.py: the proxy ranking against full training


def test_kendall_tau_b_counts_concordant_and_discordant_pairs_by_hand():
    from benchmarks.plan_frontier import kendall_tau_b

    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair of six: (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: pairs 01 02 03 13 concordant, 12 tied in x only, 23 tied in y only: 4 / sqrt((4 + 1) * (4 + 1))
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert math.isnan(kendall_tau_b([1, 1], [2, 3]))  # nothing to rank
