"""Training for real on the embedded data: loss falls, resume is exact, DDP matches one process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from timm.scheduler import create_scheduler_v2

import cskd.engine
import cskd.teachers
import cskd.train
from cskd.checkpoint import load_state, load_weights, save_weights
from cskd.config import load_config
from cskd.distributed import DistEnv
from cskd.errors import CSKDError
from cskd.files import file_sha256
from cskd.models import create_teacher
from cskd.run import RunDir
from cskd.tasks import load_trained
from cskd.train import schedule_changes, train, train_sampler
from tests.conftest import quick_overrides, random_images, write_idx_images

# No randomness from augmentation, so runs compare exactly.
PLAIN = {"data.auto_augment": "null", "data.scale": "[1.0, 1.0]", "data.hflip": 0, "data.reprob": 0, "data.color_jitter": 0}


def run(tmp_path, name="run", **extra):
    cfg = load_config(None, quick_overrides(tmp_path, output=str(tmp_path / name), **extra))
    return train(cfg, show_progress=False)


@pytest.mark.slow
def test_cskd_training_makes_the_loss_fall(tmp_path):
    # the paper's hard targets: the demo's soft KL terms are summed over cells and fall more slowly
    result = run(tmp_path, **{"train.epochs": 4, "train.lr": 0.1, "data.max_train": 512, **PLAIN,
                              "loss.deit_type": "hard", "loss.cskd_type": "hard"})
    rows = RunDir(result.run_dir).metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses  # falls every epoch
    assert losses[-1] < 0.85 * losses[0]
    assert rows[-1]["val_top1_fused"] > 15.0  # chance is 10%
    assert {"loss_base", "loss_deit", "loss_cskd", "lr", "ckf_ratio", "images_per_s", "val_top1_fused"} <= set(rows[0])
    # linear CKF: r = 1 - progress at the end of each epoch
    assert [round(r["ckf_ratio"], 6) for r in rows] == [0.75, 0.5, 0.25, 0.0]
    assert (result.run_dir / "curves.png").stat().st_size > 10_000
    assert {"config.yaml", "metrics.jsonl", "best.safetensors", "last.safetensors", "last.state.pt"} <= {
        p.name for p in result.run_dir.iterdir()}


def _crash_at_step(monkeypatch, step: int):
    calls = {"n": 0}
    original = cskd.engine._loss_parts

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt  # as if the machine went away mid-epoch
        return original(*args, **kwargs)

    monkeypatch.setattr(cskd.engine, "_loss_parts", crashing)


@pytest.mark.slow
def test_resume_after_a_mid_epoch_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    extra = {"train.epochs": 3, "data.max_train": 128}  # 4 steps per epoch, augmentation on
    reference = run(tmp_path, "reference", **extra)
    _crash_at_step(monkeypatch, 4 * 1 + 2)  # during epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **extra)
    monkeypatch.undo()
    assert [r["epoch"] for r in RunDir(tmp_path / "crashed").metrics()] == [1]
    cfg = load_config(tmp_path / "crashed" / "config.yaml")
    resumed = train(cfg, resume=True, show_progress=False)
    a, b = load_file(reference.run_dir / "last.safetensors"), load_file(resumed.run_dir / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731  clocks: *_s
    assert strip(RunDir(resumed.run_dir).metrics()) == strip(RunDir(reference.run_dir).metrics())


@pytest.mark.slow
def test_resume_with_a_transfer_set_equals_an_uninterrupted_run(tmp_path, monkeypatch, micro_teacher):
    """A crash in epoch 2, whose transfer images start the stream's second pass, mixup on."""
    write_idx_images(tmp_path / "train-images-idx3-ubyte", random_images(96))
    extra = {"train.epochs": 2, "data.max_train": 128, "data.unlabeled": str(tmp_path), "data.unlabeled_ratio": 0.5,
             "data.mixup": 0.8, "teacher.cache": "null", **dict(o.split("=", 1) for o in micro_teacher)}
    reference = run(tmp_path, "reference", **extra)
    assert "transfer_images" in load_state(reference.run_dir / "last.state.pt")["schedule"]
    _crash_at_step(monkeypatch, 4 * 1 + 2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **extra)
    monkeypatch.undo()
    resumed = train(load_config(tmp_path / "crashed" / "config.yaml"), resume=True, show_progress=False)
    a, b = load_file(reference.run_dir / "last.safetensors"), load_file(resumed.run_dir / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in RunDir(resumed.run_dir).metrics()] == [r["loss"] for r in RunDir(reference.run_dir).metrics()]


@pytest.mark.slow
def test_a_run_started_from_another_run_says_what_it_loaded_and_exports_as_any_run(tmp_path, capsys):
    """A run of 7 classes seeds a run of 10 (the embedded data) at a learning rate too small to move
    anything: the fine-tuned run's weights are the source's but for the re-initialised heads, a
    resume does not load them again, and `cskd export` packages it as it packages any run."""
    from fastapi.testclient import TestClient

    from cskd.data.datasets import build_dataset
    from cskd.export.exporter import ExportOptions, export_model
    from cskd.runtime.package import read_package
    from cskd.runtime.predict import predict_files
    from cskd.serve.app import create_app

    source = run(tmp_path, "source", **{"train.epochs": 1})
    tensors = load_file(source.run_dir / "last.safetensors")
    tensors = {k: (v[:7] if k.startswith("head") else v) for k, v in tensors.items()}  # as if it had 7 classes
    spec = load_weights(source.run_dir / "last.safetensors")[1]
    save_weights(tmp_path / "seven" / "best.safetensors", tensors, replace(spec, num_classes=7, class_names=spec.class_names[:7]))
    capsys.readouterr()
    still = {"train.epochs": 1, "train.lr": 1e-12, "train.min_lr": 0, "train.weight_decay": 0}
    tuned = run(tmp_path, "tuned", **still, **{"student.init": str(tmp_path / "seven")})
    printed = capsys.readouterr().out
    assert f"init from {tmp_path / 'seven' / 'best.safetensors'}" in printed and "4 newly initialised" in printed
    after = load_file(tuned.run_dir / "last.safetensors")
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in tensors.items() if not k.startswith("head"))
    cfg = load_config(tuned.run_dir / "config.yaml", ["train.epochs=2"])
    train(cfg, resume=True, show_progress=False)
    assert "init from" not in capsys.readouterr().out  # the resume state holds the weights
    resumed = load_file(tuned.run_dir / "last.safetensors")  # not the source's again: the heads are the tuned run's own
    assert all(torch.allclose(resumed[k], after[k], atol=1e-6) for k in after)
    folder, package = export_model(tuned.run_dir, ExportOptions(out=tmp_path / "pkg", parity_images=64), log=lambda _: None)
    assert len(read_package(folder).classes) == 10 and package.gate["passed"]
    image = tmp_path / "val5.png"
    build_dataset("fashion-mnist-demo", "val")[0][5][0].save(image)
    with TestClient(create_app(folder)) as client:  # `cskd serve` of the fine-tuned package
        response = client.post("/predict?top_k=2", files=[("files", (image.name, image.read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    expected = predict_files(folder, [image], k=2)[0]["top"]
    assert [t["index"] for t in response.json()["predictions"][0]["top"]] == [t["index"] for t in expected]


@pytest.mark.slow
def test_layer_decay_slows_the_lower_layers_and_logs_the_schedules_rate(tmp_path):
    """train.layer_decay reaches the optimizer: the logged rate is the schedule's (the heads'), as
    without it; the stem (decay^(depth+1) = 1/4 of the rate at depth 1 and decay 0.5) moves about a
    quarter as far from the same start (Adam's steps scale with the rate), the head about as far.
    A resume keeps the saved moments under the resumed config's decay."""
    start = {"train.epochs": 1, "student.kwargs": "{embed_dim: 32, depth: 1, num_heads: 2}"}
    plain, decayed = run(tmp_path, "plain", **start), run(tmp_path, "decayed", **start, **{"train.layer_decay": 0.5})
    assert [r["lr"] for r in RunDir(decayed.run_dir).metrics()] == [r["lr"] for r in RunDir(plain.run_dir).metrics()]
    initial = load_file(run(tmp_path, "still", **start, **{"train.lr": 1e-12, "train.min_lr": 0}).run_dir / "last.safetensors")
    weights = {r.run_dir.name: load_file(r.run_dir / "last.safetensors") for r in (plain, decayed)}

    def moved(name: str, key: str) -> float:
        return float((weights[name][key] - initial[key]).norm())

    assert moved("decayed", "pos_embed") < 0.5 * moved("plain", "pos_embed")
    assert 0.5 < moved("decayed", "head.weight") / moved("plain", "head.weight") < 2

    # a resume takes the saved moments with this config's scales; a resume that changes the groups is refused
    from cskd.train import build_session

    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    resumed = build_session(load_config(decayed.run_dir / "config.yaml", ["train.epochs=2", "train.layer_decay=0.25"]), cpu, True)
    stem = next(g for g in resumed.ctx.optimizer.param_groups if any(p is resumed.model.vit.pos_embed for p in g["params"]))
    assert stem["lr_scale"] == pytest.approx(0.25 ** 2) and resumed.ctx.optimizer.state  # depth 1: decay^(1+1)
    with pytest.raises(CSKDError, match=r"saved with train.layer_decay=0.5, not None.*resume with train.layer_decay=0.5"):
        build_session(load_config(decayed.run_dir / "config.yaml", ["train.epochs=2", "train.layer_decay=null"]), cpu, True)


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    first = run(tmp_path, "r", **{"train.epochs": 1})
    digest = file_sha256(first.run_dir / "last.safetensors")
    original = cskd.engine._loss_parts

    def nan_loss(*args, **kwargs):
        parts = original(*args, **kwargs)
        parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(cskd.engine, "_loss_parts", nan_loss)
    cfg = load_config(first.run_dir / "config.yaml", ["train.epochs=2"])
    with pytest.raises(CSKDError, match="training diverged: the loss is nan at epoch 2"):
        train(cfg, resume=True, show_progress=False)
    assert file_sha256(first.run_dir / "last.safetensors") == digest


def test_an_existing_run_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.state.pt").write_bytes(b"precious")
    with pytest.raises(CSKDError, match="already holds a run; continue it with `cskd train --resume"):
        run(tmp_path)
    assert (tmp_path / "run" / "last.state.pt").read_bytes() == b"precious"


@pytest.mark.slow
def test_teacher_training_writes_a_loadable_teacher(tmp_path):
    result = run(tmp_path, "teacher", **{"train.target": "teacher", "train.epochs": 1, "teacher.kwargs": "{output_stride: 8}",
                                         "teacher.checkpoint": "null"})
    spec = load_trained(result.run_dir).spec
    assert spec.role == "teacher" and spec.kwargs == {"output_stride": 8}
    teacher = create_teacher(spec.model, 10, 1, checkpoint=result.run_dir, **spec.kwargs)
    dense, global_logits = teacher(torch.rand(2, 1, 32, 32))
    assert dense.shape == (2, 10, 4, 4) and global_logits.shape == (2, 10)
    run_dir = RunDir(result.run_dir)  # no teacher to report, nothing for the guard to judge
    assert run_dir.teacher_val_top1 is None and not any("guard" in row for row in run_dir.metrics())


@pytest.mark.slow
def test_a_teacher_weaker_than_the_labels_gets_one_guard_message_recorded_in_its_epoch(tmp_path, capsys, monkeypatch,
                                                                                       micro_teacher):
    """The random-weight micro teacher (about 10%) against a student the labels lift above it in one epoch."""
    cfg = load_config(None, [*quick_overrides(tmp_path), *micro_teacher])
    train(cfg, show_progress=False)
    out = capsys.readouterr().out
    run_dir = RunDir(tmp_path / "run")
    teacher = run_dir.teacher_accuracy
    assert teacher.images == 128 and f"teacher: cskd_resnet_micro {teacher.top1:.2f}% top-1" in out
    guarded = [row for row in run_dir.metrics() if "guard" in row]
    assert len(guarded) == 1 and out.count("  guard (epoch ") == 1
    row, record = guarded[0], guarded[0]["guard"]
    # judged once the window (two epochs) is full, at epoch 2 of two (past guard.min_progress, 0.25),
    # on the class token's mean over both, above the teacher's
    cls_mean = sum(r["val_top1_cls"] for r in run_dir.metrics()[:2]) / 2
    assert row["epoch"] == 2 and record["fired"] and record["reason"] == "cls_above_teacher" and record["epochs"] == [1, 2]
    assert record["teacher_top1"] == teacher.top1 < record["cls_top1"] == pytest.approx(cls_mean)
    assert (f"guard (epoch 2): the class token (label-trained) reaches {cls_mean:.1f}% on validation (mean of epochs 1-2), "
            f"above the teacher's {teacher.top1:.1f}%") in out
    assert "loss.deit_type=none loss.cskd_type=none" in out and "this run goes on unchanged" in out

    # a resume neither measures the teacher again nor repeats the message
    monkeypatch.setattr(cskd.teachers, "measure_teacher", lambda *a, **k: pytest.fail("the teacher was measured again"))
    train(load_config(None, [*quick_overrides(tmp_path, **{"train.epochs": 3}), *micro_teacher]), resume=True, show_progress=False)
    out = capsys.readouterr().out
    assert "(as this run recorded it)" in out and "guard (" not in out
    assert [row["epoch"] for row in run_dir.metrics() if "guard" in row] == [2]


@pytest.mark.slow
def test_a_run_whose_class_token_stays_below_the_teacher_records_no_guard(tmp_path, capsys):
    # the packaged 92% teacher; guard.margin=100 leaves only condition (a) to judge
    train(load_config(None, quick_overrides(tmp_path, **{"guard.margin": 100})), show_progress=False)
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.teacher_val_top1 > max(row["val_top1_cls"] for row in run_dir.metrics())
    assert not any("guard" in row for row in run_dir.metrics()) and "guard (" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("transfer", [False, True], ids=["labelled", "with-transfer-set"])
def test_ddp_on_two_processes_matches_one_process_with_twice_the_batch(tmp_path, micro_teacher, transfer):
    """gloo, 2 CPU processes x batch 8 against 1 process x batch 16, SGD (linear in the gradients).

    Both see the same images per step (one DistributedSampler permutation; with a transfer set, each
    process every other image of one transfer stream); the only difference is float summation order
    in the gradient all-reduce, so weights agree to 1e-5.
    """
    common = {**PLAIN, "train.opt": "sgd", "train.lr": 0.05, "train.epochs": 2, "data.max_train": 64, "train.threads": 1}
    if transfer:
        write_idx_images(tmp_path / "train-images-idx3-ubyte", random_images(40))
        common.update({"data.unlabeled": str(tmp_path), "data.unlabeled_ratio": 0.5, "teacher.cache": "null",
                       **dict(o.split("=", 1) for o in micro_teacher)})
    args = quick_overrides(tmp_path, output=str(tmp_path / "ddp"), **{**common, "train.batch_size": 8})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "cskd", "train", "--no-progress", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run(tmp_path, "single", **{**common, "train.batch_size": 16})
    a, b = load_file(tmp_path / "ddp" / "last.safetensors"), load_file(single.run_dir / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ddp_rows, single_rows = RunDir(tmp_path / "ddp").metrics(), RunDir(single.run_dir).metrics()
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in single_rows], rel=1e-5)
    assert [r["val_top1_fused"] for r in ddp_rows] == [r["val_top1_fused"] for r in single_rows]


@pytest.mark.slow
def test_a_deit_run_predicts_with_the_heads_it_trained(tmp_path):
    result = run(tmp_path, "deit", **{"loss.cskd_type": "none", "train.epochs": 1})
    trained = load_trained(result.run_dir)
    assert trained.spec.heads == ["cls", "dist"] and trained.heads == ("cls", "dist")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = trained.model.forward_heads(x)
        assert torch.allclose(trained.model(x), (out.cls + out.dist) / 2, atol=1e-6)


def test_a_resume_that_adds_or_drops_the_transfer_set_says_so():
    labelled = {"epochs": 4, "steps_per_epoch": 2, "batch_size": 8, "world_size": 1, "train_images": 16}
    transfer = {**labelled, "transfer_images": 40, "transfer_batch": 4}
    assert schedule_changes(transfer, labelled) == ["transfer images 40 -> none", "transfer images per step 4 -> none"]
    assert schedule_changes(labelled, transfer) == ["transfer images none -> 40", "transfer images per step none -> 4"]


def test_repeated_augmentation_spreads_each_image_over_the_processes():
    """DeiT's RASampler with 3 repeats on 3 processes: each process sees the same images in an epoch
    (each under its own augmentation), an epoch keeps the dataset's length per world, and the order
    changes with the epoch; without repeats every image is seen exactly once per epoch."""
    dataset = list(range(512))
    cfg = load_config(None, ["data.repeated_aug=3"])
    samplers = [train_sampler(dataset, cfg, DistEnv(rank, 3, rank, torch.device("cpu"))) for rank in range(3)]
    per_rank = [list(s) for s in samplers]
    assert [len(r) for r in per_rank] == [512 // 3] * 3
    assert per_rank[0] == per_rank[1] == per_rank[2]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]

    plain = load_config(None, ["data.repeated_aug=0"])
    once = [train_sampler(dataset, plain, DistEnv(rank, 2, rank, torch.device("cpu"))) for rank in range(2)]
    assert sorted(list(once[0]) + list(once[1])) == dataset


SUPERVISED = {"loss.deit_type": "none", "loss.cskd_type": "none"}  # no teacher, no pairing report: seconds a run


def cosine_end_of_epoch_lrs(epochs: int, steps_per_epoch: int, batch_size: int, cfg) -> list[float]:
    """The LR after each epoch of timm's cosine built afresh for ``epochs`` (what a run planned that
    long from the start follows), at ``train.lr`` scaled to the batch as DeiT does."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr * batch_size / 512)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=0, min_lr=cfg.train.min_lr,
                                       warmup_lr=cfg.train.warmup_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    lrs = []
    for epoch in range(epochs):
        scheduler.step_update(num_updates=(epoch + 1) * steps_per_epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [32, 16], ids=["same-batch", "half-batch"])
def test_a_longer_resume_follows_the_cosine_over_the_new_total(tmp_path, capsys, batch_size):
    first = run(tmp_path, **SUPERVISED)  # 2 epochs of 8 steps at batch 32
    cfg = load_config(first.run_dir / "config.yaml", ["train.epochs=4", f"train.batch_size={batch_size}"])
    train(cfg, resume=True, show_progress=False)
    rows = RunDir(first.run_dir).metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    lrs = [r["lr"] for r in rows]
    assert lrs[:2] == pytest.approx(cosine_end_of_epoch_lrs(2, 8, 32, cfg), rel=1e-9)
    # epochs 3 and 4 at the new total's cosine (with the new batch: more steps, linearly scaled LR), not min_lr
    steps = 256 // batch_size
    assert lrs[2:] == pytest.approx(cosine_end_of_epoch_lrs(4, steps, batch_size, cfg)[2:], rel=1e-9)
    assert lrs[2] > 10 * cfg.train.min_lr
    assert [r["ckf_ratio"] for r in rows] == pytest.approx([0.5, 0.0, 0.25, 0.0])  # linear CKF over the new total
    out = capsys.readouterr().out
    assert "train.epochs 2 -> 4" in out
    assert ("train.batch_size 32 -> 16, steps/epoch 8 -> 16" in out) == (batch_size == 16)


def _kill_after_writes(monkeypatch, count: int) -> None:
    """Stop the run (as a kill would) at the first write of a run file after ``count`` of them."""
    done = {"n": 0}

    def counted(write):
        def wrapper(*args, **kwargs):
            if done["n"] == count:
                raise KeyboardInterrupt
            done["n"] += 1
            return write(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cskd.train, "save_weights", counted(cskd.train.save_weights))
    monkeypatch.setattr(cskd.train, "save_state", counted(cskd.train.save_state))
    monkeypatch.setattr(RunDir, "append_metrics", counted(RunDir.append_metrics))


def _weights_and_epoch(path):
    from cskd.checkpoint import load_weights

    tensors, _, info = load_weights(path)
    return tensors, info["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("written", [1, 2, 3], ids=["after-1-write", "after-2-writes", "after-3-writes"])
def test_a_kill_between_the_epochs_writes_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, written):
    # both epochs are best here, so each writes 4 files (metrics row, last, resume state, best)
    extra = {**SUPERVISED, "train.lr": 0.1}
    reference = run(tmp_path, "reference", **extra)
    assert reference.best_epoch == 2, "premise: epoch 2 improves on epoch 1, so it writes best.safetensors"
    _kill_after_writes(monkeypatch, 4 + written)  # in the middle of epoch 2's writes
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", **extra)
    monkeypatch.undo()
    resumed = train(load_config(tmp_path / "killed" / "config.yaml"), resume=True, show_progress=False)
    assert resumed.best_epoch == reference.best_epoch == 2
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731  clocks: *_s
    assert strip(RunDir(resumed.run_dir).metrics()) == strip(RunDir(reference.run_dir).metrics())  # each epoch once
    for name in ("best.safetensors", "last.safetensors"):
        (a, a_epoch), (b, b_epoch) = _weights_and_epoch(reference.run_dir / name), _weights_and_epoch(resumed.run_dir / name)
        assert a_epoch == b_epoch == 2 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _scoring_zero(monkeypatch) -> None:
    """Every evaluation from now on scores 0% on every head: an epoch worse than any before."""
    original = cskd.train.evaluate

    def zero(*args, **kwargs):
        result = original(*args, **kwargs)
        return {**result, "top1": {head: 0.0 for head in result["top1"]}}

    monkeypatch.setattr(cskd.train, "evaluate", zero)


@pytest.mark.slow
@pytest.mark.parametrize("written", [1, 2, 3], ids=["after-1-write", "after-2-writes", "after-3-writes"])
def test_best_weights_are_the_best_epochs_after_a_kill_and_a_resume_that_scores_lower(tmp_path, monkeypatch, written):
    # Epoch 2 beats epoch 1 and the run is killed among its writes; the resume runs longer and every
    # epoch it trains (a redone epoch 2 included) scores lower, as a changed config or nondeterministic
    # kernels may. best.safetensors must hold the epoch the state and metrics call best, whatever that is.
    _kill_after_writes(monkeypatch, 4 + written)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, **SUPERVISED, **{"train.lr": 0.1})
    monkeypatch.undo()
    killed = [r["val_top1_fused"] for r in RunDir(tmp_path / "run").metrics()]
    assert killed[1] > killed[0], "premise: epoch 2 (its metrics row is the first write) improves on epoch 1"
    _scoring_zero(monkeypatch)
    resumed = train(load_config(tmp_path / "run" / "config.yaml", ["train.epochs=3"]), resume=True, show_progress=False)
    top1 = [r["val_top1_fused"] for r in RunDir(resumed.run_dir).metrics()]
    assert len(top1) == 3 and resumed.best_epoch == top1.index(max(top1)) + 1 and resumed.best_top1 == max(top1)
    _, _, info = load_weights(resumed.run_dir / "best.safetensors")
    assert (info["epoch"], info["val_top1"]) == (resumed.best_epoch, resumed.best_top1)
    assert resumed.best_epoch == (2 if written == 3 else 1)  # epoch 2 kept once its state was saved; a redo scores 0


@pytest.mark.slow
def test_a_run_killed_before_its_first_state_starts_again_without_its_rows(tmp_path, monkeypatch):
    _kill_after_writes(monkeypatch, 1)  # epoch 1's metrics row is written, its state never is
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, **SUPERVISED, **{"train.epochs": 1})
    monkeypatch.undo()
    assert len(RunDir(tmp_path / "run").metrics()) == 1
    run(tmp_path, **SUPERVISED, **{"train.epochs": 1})  # no state: a fresh start in the same folder
    assert [r["epoch"] for r in RunDir(tmp_path / "run").metrics()] == [1]


@pytest.mark.slow
def test_training_off_a_terminal_logs_a_line_per_epoch_not_bar_frames(tmp_path, capsys):
    cfg = load_config(None, quick_overrides(tmp_path, **SUPERVISED))
    train(cfg, show_progress=True)  # pytest's captured stderr is not a terminal, like CI or `docker logs`
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar frame anywhere, whatever else (warnings...) stderr holds
    summaries = [line.split(":")[0] for line in err.splitlines() if line.startswith("epoch ")]
    assert summaries == ["epoch 1/2", "epoch 2/2"]  # one summary line per epoch


def cosine_lr(step: int, total: int, batch_size: int, cfg) -> float:
    """The cosine's LR after ``step`` of ``total`` updates, no warm-up, by its formula (min_lr once it ends)."""
    lr, low = cfg.train.lr * batch_size / 512, cfg.train.min_lr
    return low if step >= total else low + 0.5 * (lr - low) * (1 + math.cos(math.pi * step / total))


@pytest.mark.slow
def test_a_step_budget_ends_the_run_there_with_the_schedule_laid_out_over_it(tmp_path):
    # 256 images at batch 32: 8 steps an epoch; 12 steps cut the second epoch at 4, and the third never runs
    result = run(tmp_path, **SUPERVISED, **{"train.epochs": 3, "train.max_steps": 12})
    rows = RunDir(result.run_dir).metrics()
    assert [r["epoch"] for r in rows] == [1, 2] and [r["steps"] for r in rows] == [8, 4]
    cfg = load_config(result.run_dir / "config.yaml")
    # the cosine over 12 steps (at its floor when the budget ends), not over the 24 of three epochs
    assert [r["lr"] for r in rows] == pytest.approx([cosine_lr(8, 12, 32, cfg), cfg.train.min_lr], rel=1e-9)
    assert [r["ckf_ratio"] for r in rows] == pytest.approx([1 - 8 / 12, 0.0])  # linear CKF over the budget too
    assert load_state(result.run_dir / "last.state.pt")["schedule"]["max_steps"] == 12
    with pytest.raises(CSKDError, match="train.max_steps=2.5 is not a whole number"):
        load_config(None, ["train.max_steps=2.5"])
    assert load_config(None, ["train.warmup_epochs=0.25"]).train.warmup_epochs == 0.25  # a budget's share of an epoch


@pytest.mark.slow
def test_each_epoch_row_says_when_the_epoch_started_so_its_own_time_leaves_the_runs_start_out(tmp_path, monkeypatch):
    real = cskd.train.build_session
    monkeypatch.setattr(cskd.train, "build_session", lambda *args, **kwargs: (time.sleep(1.0), real(*args, **kwargs))[1])
    first, second = RunDir(run(tmp_path, **SUPERVISED).run_dir).metrics()  # a start of over a second
    assert first["epoch_start_s"] >= 1.0 and second["epoch_start_s"] >= first["time_s"]
    for row in (first, second):
        own = row["time_s"] - row["epoch_start_s"]
        assert 0 < own < first["time_s"] - 1.0  # the epoch alone, the run's start left out
        assert 0 < row["val_s"] < own and row["steps"] == 8  # its validation pass is part of it
