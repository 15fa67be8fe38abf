"""Config: YAML < overrides precedence, typed values, clear errors for unknown keys and ranges."""

from __future__ import annotations

import pytest

from cskd.config import Config, load_config, parse_override, save_config
from cskd.errors import CSKDError


def test_packaged_demo_config_loads_and_overrides_win(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "loss.decay=cos", "student.kwargs={depth: 2}"])
    assert cfg.data.name == "fashion-mnist-demo" and cfg.teacher.checkpoint == "demo"
    assert cfg.train.epochs == 3 and cfg.loss.decay == "cos" and cfg.student.kwargs == {"depth": 2}


def test_yaml_file_overrides_dataclass_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.002\n  target: teacher\nteacher:\n  model: resnet18\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.002 and cfg.teacher.model == "resnet18"
    assert cfg.train.batch_size == Config().train.batch_size


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.seed=7", "output=" + str(tmp_path / "r")])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()


def test_override_values_are_parsed_as_yaml():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 alone reads a string
    assert parse_override("data.scale=[0.5, 1.0]") == ("data.scale", [0.5, 1.0])
    assert parse_override("teacher.checkpoint=null") == ("teacher.checkpoint", None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr' \(did you mean: train.lr"),
        ("train.lr=-1", r"train.lr=-1.0 is out of range"),
        ("loss.alpha=1.5", r"loss.alpha=1.5 is out of range"),
        ("train.epochs=2.5", r"train.epochs takes a whole number"),
        ("train.epochs=ten", r"train.epochs takes a number"),
        ("loss.decay=exp", r"loss.decay='exp' is not one of linear, x2, cos, none"),
        ("data.name=mnist", r"data.name='mnist' is not one of"),
        ("student.patch_size=5", r"not a multiple of student.patch_size=5"),
        ("train.ema=maybe", r"train.ema takes true or false"),
        ("epochs", r"is not key=value"),
        ("student.kwargs={depth:4}", r"space after each colon"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(CSKDError, match=message):
        load_config(None, [override])


def test_distillation_without_teacher_says_how_to_get_one():
    with pytest.raises(CSKDError, match="train.target=teacher"):
        load_config(None, ["teacher.checkpoint=null"])


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(CSKDError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CSKDError, match="not valid YAML"):
        load_config(bad)
