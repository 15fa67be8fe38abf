"""The distillation guard on hand-built metrics rows: when it fires, on what figures, and what it advises."""

from __future__ import annotations

import json

import pytest

from cskd.config import load_config
from cskd.errors import CSKDError
from cskd.guard import CLS_ABOVE_TEACHER, TEACHER_HEADS_TRAIL, fired, judge, judge_run
from cskd.run import RunDir

CSKD = ("dist", "dense")


def rows(*heads: tuple) -> list[dict]:
    """Metrics rows of epochs 1..n from ``(cls, dist, dense)`` validation top-1 triples."""
    return [{"epoch": i, "loss": 1.0, "val_top1_cls": c, "val_top1_dist": d, "val_top1_dense": e, "val_top1_fused": (c + d + e) / 3}
            for i, (c, d, e) in enumerate(heads, 1)]


def test_the_class_token_above_the_teacher_fires_on_the_mean_of_the_last_two_epochs():
    history = rows((70, 70, 70), (80, 79, 79), (84, 83, 83.5), (86, 84, 85))
    verdict = judge(history, teacher_top1=84.5, heads=CSKD, epochs=8, margin=5.0)
    assert verdict is not None and verdict.reason == CLS_ABOVE_TEACHER
    assert verdict.cls_top1 == pytest.approx(85.0) and verdict.epochs == (3, 4) and verdict.epoch == 4
    assert verdict.heads_top1 == pytest.approx({"dist": 83.5, "dense": 84.25})
    finding = "the class token (label-trained) reaches 85.0% on validation (mean of epochs 3-4), above the teacher's 84.5%"
    assert finding in verdict.message()
    # the same rows against a teacher at 85.0: not above it (and the heads keep within the margin)
    assert judge(history, teacher_top1=85.0, heads=CSKD, epochs=8, margin=5.0) is None


def test_one_lucky_epoch_above_the_teacher_does_not_fire():
    assert judge(rows((80, 80, 80), (86, 85, 85)), teacher_top1=84.0, heads=CSKD, epochs=4, margin=5.0) is None


def test_nothing_is_judged_before_the_minimum_progress():
    history = rows((90, 60, 60), (90, 60, 60))
    assert judge(history, 80.0, CSKD, epochs=10, min_progress=0.25) is None  # 2 of 10 epochs
    assert judge(history, 80.0, CSKD, epochs=8, min_progress=0.25).reason == CLS_ABOVE_TEACHER  # 2 of 8


def test_the_first_epoch_of_a_short_run_is_not_judged_alone():
    # cskd plan's 2-epoch proxies: epoch 1 is half the run, but one epoch is not the window the guard averages
    trailing = rows((50.0, 48.0, 47.2))
    assert judge(trailing, 92.0, CSKD, epochs=2, margin=1.0, min_progress=0.25) is None
    verdict = judge(rows((50.0, 48.0, 47.2), (56.0, 54.0, 53.0)), 92.0, CSKD, epochs=2, margin=1.0, min_progress=0.25)
    assert verdict.reason == TEACHER_HEADS_TRAIL and verdict.epochs == (1, 2)  # cls 53.0 against dist 51.0


def test_the_teacher_taught_heads_trailing_by_more_than_the_margin_fire_on_the_best_of_them():
    teacher = 90.0  # stronger than every head: only (b) can fire
    issue_28 = rows((85.8, 82.4, 83.8), (85.8, 82.4, 83.8))  # the issue's CSKD student, two epochs alike
    verdict = judge(issue_28, teacher, CSKD, epochs=4, margin=1.0)
    assert verdict.reason == TEACHER_HEADS_TRAIL and verdict.best_head == "dense"
    assert "at best 83.8% (dense) against 85.8% on validation (mean of epochs 1-2), 2.0 points behind" in verdict.message()
    assert judge(issue_28, teacher, CSKD, epochs=4, margin=2.5) is None  # 2.0 points are within a 2.5 margin
    # one head far behind while the other keeps up: the best keeps within the margin
    assert judge(rows((85, 70, 84.5), (85, 70, 84.5)), teacher, CSKD, epochs=4, margin=1.0) is None
    # a DeiT run follows the teacher with the distillation token alone
    deit = judge(rows((85, 83, 40), (85, 83, 40)), teacher, ("dist",), epochs=4, margin=1.0)
    assert deit.reason == TEACHER_HEADS_TRAIL and deit.heads_top1 == {"dist": 83.0}


def test_the_advice_names_the_switches_that_apply_to_the_run():
    cskd = judge(rows((86, 84, 84), (86, 84, 84)), 85.0, CSKD, epochs=2).advice()
    assert "loss.cskd_type=none" in cskd and "loss.deit_type=none loss.cskd_type=none" in cskd and "loss.cskd_weight" in cskd
    assert "teacher further" in cskd
    deit = judge(rows((86, 84, 0), (86, 84, 0)), 85.0, ("dist",), epochs=2).advice()
    assert "loss.cskd_type=none`)" not in deit.replace("loss.deit_type=none loss.cskd_type=none", "")
    assert "loss.cskd_weight" not in deit and "loss.deit_type=none loss.cskd_type=none" in deit


def test_a_record_says_it_fired_and_a_run_knows_it_did():
    verdict = judge(rows((86, 84, 84), (86, 84, 84)), 85.0, CSKD, epochs=2)
    record = verdict.record()
    assert record["fired"] and record["reason"] == CLS_ABOVE_TEACHER and record["teacher_top1"] == 85.0
    history = rows((86, 84, 84), (86, 84, 84))
    assert not fired(history)
    history[1]["guard"] = json.loads(json.dumps(record))
    assert fired(history)


def write_run(tmp_path, overrides, teacher_top1, history) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.save_config(load_config(None, overrides))
    run.save_pairing({} if teacher_top1 is None else {"teacher_val_top1": teacher_top1, "teacher_val_top5": 99.0,
                                                      "teacher_val_split": {"images": 2000}})
    for row in history:
        run.append_metrics(row)
    return run


def test_a_finished_run_is_replayed_to_the_epoch_it_would_have_fired_at(tmp_path):
    history = rows((70, 72, 72), (80, 81, 81), (84, 83, 83), (86, 84, 84), (87, 84, 84), (87, 84, 84))
    run = write_run(tmp_path, ["train.epochs=6"], 84.5, history)
    verdict = judge_run(run.path)
    assert (verdict.epoch, verdict.reason, verdict.epochs) == (4, CLS_ABOVE_TEACHER, (3, 4))
    assert judge_run(run.path, teacher_top1=95.0).reason == TEACHER_HEADS_TRAIL  # 87 vs 84: 3 points behind
    assert judge_run(run.path, teacher_top1=95.0, margin=3.5) is None
    assert judge_run(run.path, min_progress=1.0).epoch == 6


def test_replaying_a_run_the_guard_cannot_judge_says_why(tmp_path):
    history = rows((86, 84, 84), (86, 84, 84))
    with pytest.raises(CSKDError, match="has no teacher top-1 in pairing.json .*pass teacher_top1="):
        judge_run(write_run(tmp_path / "a", ["train.epochs=2"], None, history).path)
    with pytest.raises(CSKDError, match="not a distilled student run .*loss.deit_type=none"):
        judge_run(write_run(tmp_path / "b", ["train.epochs=2", "loss.deit_type=none", "loss.cskd_type=none"], 90.0, history).path)
