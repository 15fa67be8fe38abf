"""The command line end to end, as a user runs it: train, eval, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from cskd.cli import parse_args
from cskd.files import file_sha256
from tests.conftest import quick_overrides, write_imagefolder


def cskd(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cskd", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_commands_with_examples():
    top = cskd("--help")
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout
    sub = cskd("train", "--help")
    assert "examples:" in sub.stdout and "loss.cskd_type" in sub.stdout


@pytest.mark.slow
def test_train_eval_resume_round_trip(tmp_path):
    args = quick_overrides(tmp_path)
    trained = cskd("train", "--no-progress", *args)
    assert trained.returncode == 0, trained.stderr
    assert "best val top-1 (fused)" in trained.stdout and "next: cskd eval" in trained.stdout
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2

    evaluated = cskd("eval", str(run), "--no-progress", "--json", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["top1"]) == {"cls", "dist", "dense", "fused"}
    # eval sees the whole validation split; the run validated on a 128-image subset
    assert result["count"] == 2000
    assert all(result["top1"][h] <= result["top5"][h] for h in result["top1"])
    assert "fused" in evaluated.stdout and "top-5" in evaluated.stdout
    # the teacher beside the heads: the figure the run measured on its validation images, and printed
    pairing = json.loads((run / "pairing.json").read_text())
    assert result["teacher"] == {"model": "regnety_016", "top1": pairing["teacher_val_top1"], "top5": pairing["teacher_val_top5"],
                                 "count": 128}
    assert f"teacher: regnety_016 {pairing['teacher_val_top1']:.2f}% top-1" in trained.stdout
    assert f"{'teacher':<8} {pairing['teacher_val_top1']:>6.2f}%" in evaluated.stdout

    resumed = cskd("train", "--no-progress", "--resume", str(run), "train.epochs=3")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 3" in resumed.stdout
    assert f"teacher: regnety_016 {pairing['teacher_val_top1']:.2f}% top-1" in resumed.stdout
    assert "as this run recorded it" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_eval_matches_the_training_time_validation(tmp_path):
    args = quick_overrides(tmp_path, **{"data.max_val": 2000, "train.epochs": 1})
    assert cskd("train", "--no-progress", *args).returncode == 0
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    evaluated = cskd("eval", str(tmp_path / "run" / "last.safetensors"), "--no-progress")
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    for head in ("cls", "dist", "dense", "fused"):
        assert result["top1"][head] == pytest.approx(metrics[f"val_top1_{head}"], abs=1e-9), evaluated.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "train.lrr=0.1"], ["unknown config key 'train.lrr'", "did you mean: train.lr"]),
        (["train", "student.model=deit_tiny_distiled_patch16_224"], ["unknown student model", "deit_tiny_distilled_patch16_224"]),
        (["train", "teacher.model=resnet_18", "train.target=teacher"], ["unknown teacher model", "resnet18"]),
        (["train", "data.name=fashion-mnist", "data.path=/nonexistent/fm"], ["/nonexistent/fm", "set data.path"]),
        (["train", "train.lr=5"], ["train.lr=5.0 is out of range"]),
        (["train", "--config", "/nonexistent.yaml"], ["does not exist"]),
        (["eval", "/nonexistent/run"], ["does not exist"]),
        (["train", "--resume", "/nonexistent/run"], ["not a run directory"]),
    ],
)
def test_bad_input_gives_one_line_and_a_nonzero_exit(tmp_path, args, fragments):
    extra = f"output={tmp_path / 'out'}" if args[0] == "train" and "--resume" not in args else "--no-progress"
    assert_one_line_error(cskd(*args, extra), *fragments)


def test_options_may_stand_before_between_and_after_the_overrides():
    args = parse_args(["train", "train.epochs=1", "--no-progress", "output=runs/x", "--config", "finetune", "data.path=/d"])
    assert args.overrides == ["train.epochs=1", "output=runs/x", "data.path=/d"] and args.no_progress
    assert str(args.config) == "finetune" and args.command == "train" and args.func is not None
    cached = parse_args(["cache-teacher", "data.workers=0", "--out", "runs/c", "student.img_size=32", "--topk", "3"])
    assert cached.overrides == ["data.workers=0", "student.img_size=32"] and (str(cached.out), cached.topk) == ("runs/c", 3)
    served = parse_args(["serve", "runs/a", "--port", "9000", "runs/b", "--shadow", "b"])  # packages around options
    assert served.model_dirs == ["runs/a", "runs/b"] and (served.port, served.shadow) == (9000, "b")


@pytest.mark.parametrize("command", ["train", "cache-teacher"])
def test_an_override_after_an_option_reaches_the_config(command):
    """`cskd train x=y --no-progress z=w` was refused as "unrecognized arguments: z=w"; now z=w is read
    (and, being a mistyped key, refused by the config, which names it)."""
    assert_one_line_error(cskd(command, "data.workers=0", "--no-progress", "train.lrr=0.1"),
                          f"cskd {command}: error: unknown config key 'train.lrr'")
    unknown = cskd(command, "--bogus", "data.workers=0")  # argparse's own refusal: usage, then the error
    assert unknown.returncode == 2 and unknown.stderr.splitlines()[-1] == f"cskd {command}: error: unrecognized arguments: --bogus"


@pytest.mark.slow
def test_a_student_of_its_own_teacher_on_its_own_images_runs_with_the_demo_config(tmp_path, micro_teacher):
    """The README's "Your own teacher" shape: the demo config, an image folder and another teacher.
    The packaged cache (the demo teacher's, on the embedded data) is dropped with a note instead of
    stopping the run with a cache mismatch."""
    write_imagefolder(tmp_path / "data", [(32, 32)])
    proc = cskd("train", "data.name=imagefolder", f"data.path={tmp_path / 'data'}", "data.channels=1", *micro_teacher,
                "train.epochs=1", "train.batch_size=4", "data.workers=0", "student.kwargs={depth: 1}", f"output={tmp_path / 'run'}",
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "teacher.cache=demo dropped: the packaged cache holds the demo teacher's targets on the embedded data" in proc.stdout
    assert "best val top-1 (fused)" in proc.stdout


def test_teacher_of_another_class_count_is_refused(tmp_path):
    from cskd.checkpoint import ModelSpec, save_weights
    from cskd.models import create_teacher

    teacher = create_teacher("cskd_resnet_micro", 5, 1)
    save_weights(tmp_path / "t.safetensors", teacher.model.state_dict(), ModelSpec("teacher", "cskd_resnet_micro", 5, 1, 32))
    proc = cskd("train", f"teacher.checkpoint={tmp_path / 't.safetensors'}", f"output={tmp_path / 'out'}")
    assert_one_line_error(proc, "predicts 5 classes but the data has 10")


def test_corrupted_and_foreign_checkpoints_are_refused(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    assert_one_line_error(cskd("eval", str(tmp_path / "foreign.safetensors")), "not a cskd checkpoint")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_one_line_error(cskd("eval", str(tmp_path / "broken.safetensors")), "corrupted")


def test_existing_run_is_left_intact(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.state.pt").write_bytes(b"state")
    (run / "best.safetensors").write_bytes(b"weights")
    before = file_sha256(run / "best.safetensors")
    assert_one_line_error(cskd("train", f"output={run}"), "already holds a run", "--resume")
    assert file_sha256(run / "best.safetensors") == before
