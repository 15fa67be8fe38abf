"""Config: YAML < overrides precedence, typed values, clear errors for unknown keys and ranges."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cskd.config import Config, load_config, packaged_config, packaged_names, parse_override, save_config
from cskd.errors import CSKDError
from cskd.train import scaled_lr


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


@pytest.mark.parametrize("overrides", [
    ["loss.deit_type=none", "loss.cskd_type=none"],  # no teacher to supervise the transfer images
    ["train.target=teacher"],
])
def test_a_transfer_set_without_a_distilled_student_is_refused(overrides):
    with pytest.raises(CSKDError, match="data.unlabeled .* needs a distilled student"):
        load_config(None, ["data.unlabeled=/data/unlabelled", *overrides])
    with pytest.raises(CSKDError, match=r"data.unlabeled_ratio=0.0 is out of range"):
        load_config(None, ["data.unlabeled_ratio=0"])


@pytest.mark.parametrize("overrides, message", [
    (["teacher.init=w.safetensors"], "teacher.init starts the network a run trains, and this run trains the student"),
    (["student.init=w.safetensors", "train.target=teacher"], "student.init starts .* trains the teacher; set teacher.init"),
    (["student.init=w.safetensors", "student.kwargs={pretrained: true}"], "both choose the starting weights"),
])
def test_starting_weights_for_the_network_a_run_does_not_train_are_refused(overrides, message):
    with pytest.raises(CSKDError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, other", [
    (["teacher.model=resnet18", "teacher.checkpoint=runs/teacher"], "teacher.checkpoint=runs/teacher, teacher.model=resnet18"),
    (["data.name=imagefolder", "data.path=/data/pets"], "data.name=imagefolder"),
    (["teacher.kwargs={output_stride: 16}"], "teacher.kwargs={'output_stride': 16}"),
])
def test_the_demo_configs_packaged_cache_is_dropped_with_a_note_for_another_teacher_or_data(overrides, other):
    """The packaged cache is the demo teacher's on the embedded data: a run of another teacher or data
    does not inherit it from the demo config, and is told how to cache its own."""
    notes = []
    cfg = load_config(None, overrides, notes)
    assert cfg.teacher.cache is None
    assert notes == [f"teacher.cache=demo dropped: the packaged cache holds the demo teacher's targets on the embedded data "
                     f"(teacher.checkpoint=demo, data.name=fashion-mnist-demo), and this run has {other}; the teacher runs "
                     "online (to run it once instead: `cskd cache-teacher` with the same config and overrides, then "
                     "teacher.cache=ITS_FOLDER)"]


@pytest.mark.parametrize("overrides", [[], ["teacher.kwargs={output_stride: 8}"], ["train.epochs=3", "teacher.cache=demo"]])
def test_the_packaged_cache_stays_with_the_packaged_teacher_and_data(overrides):
    """The demo teacher's own output_stride (what its checkpoint records) is the same teacher."""
    notes = []
    assert load_config(None, overrides, notes).teacher.cache == "demo" and notes == []


def test_the_packaged_cache_given_on_the_command_line_for_another_teacher_is_refused():
    with pytest.raises(CSKDError, match=r"teacher.cache=demo does not fit this run: .* this run has teacher.checkpoint=runs/t; "
                                        r"drop teacher.cache .*`cskd cache-teacher`"):
        load_config(None, ["teacher.checkpoint=runs/t", "teacher.cache=demo"])


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(CSKDError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CSKDError, match="not valid YAML"):
        load_config(bad)


def test_the_packaged_recipes_are_the_ones_the_help_names():
    assert set(packaged_names()) >= {"demo", "teacher-demo", "cskd-deit-ti", "cskd-deit-s", "cskd-deit-b", "finetune",
                                     "finetune-teacher", "finetune-demo", "finetune-teacher-demo"}
    proc = subprocess.run([sys.executable, "-m", "cskd", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert all(name in " ".join(proc.stdout.split()) for name in packaged_names())


@pytest.mark.parametrize("name", packaged_names())
def test_every_packaged_config_loads_by_name(name, tmp_path):
    paper = ["data.path=" + str(tmp_path), "teacher.checkpoint=" + str(tmp_path / "w.pth")]  # the user supplies these
    overrides = paper if name.startswith(("cskd-deit", "finetune")) else []
    cfg = load_config(name, overrides)
    assert cfg.to_dict() == load_config(packaged_config(name), overrides).to_dict()


# The official CSKD configs (github.com/Zzzzz1/CSKD, configs/cskd_*.py) give the global batch and the
# learning rate directly; the presets express them per process on 8 processes with DeiT's scaling.
@pytest.mark.parametrize(
    "name, student, global_batch, official_lr",
    [
        ("cskd-deit-ti", "deit_tiny_distilled_patch16_224", 1024, 1e-3),
        ("cskd-deit-s", "deit_small_distilled_patch16_224", 512, 5e-4),
        ("cskd-deit-b", "deit_base_distilled_patch16_224", 256, 2.5e-4),
    ],
)
def test_paper_presets_reproduce_the_official_recipe(name, student, global_batch, official_lr, tmp_path):
    cfg = load_config(name, ["data.path=" + str(tmp_path), "teacher.checkpoint=" + str(tmp_path / "w.pth")])
    assert cfg.student.model == student and cfg.teacher.model == "regnety_160"
    assert cfg.train.batch_size * 8 == global_batch
    assert scaled_lr(cfg, world_size=8) == pytest.approx(official_lr)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.student.drop_path) == (300, 5, 0.0)
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.repeated_aug) == (0.8, 1.0, 0.25, 3)
    assert (cfg.loss.deit_type, cfg.loss.cskd_type, cfg.loss.alpha, cfg.loss.cskd_weight) == ("hard", "hard", 0.5, 1.0)
    assert (cfg.loss.decay, cfg.loss.ckf_progress) == ("linear", "epoch")


# The overrides that made the packaged fine-tuning recipes fine-tune the demo-size pair (README,
# benchmarks/finetune_experiment.py): what finetune-demo and finetune-teacher-demo must equal.
DEMO_STUDENT = ["data.channels=1", "data.eval_crop_pct=1.0", "student.img_size=32", "teacher.model=regnety_016",
                "teacher.kwargs={output_stride: 8}", "student.model=cskd_deit_nano_distilled_patch4_32", "student.patch_size=4",
                "train.lr=5e-3"]
DEMO_TEACHER = ["data.channels=1", "data.eval_crop_pct=1.0", "student.img_size=32", "teacher.model=regnety_016",
                "teacher.kwargs={output_stride: 8}"]


@pytest.mark.parametrize("recipe, base, overrides, from_scratch", [
    ("finetune-demo", "finetune", DEMO_STUDENT, "demo"),
    ("finetune-teacher-demo", "finetune-teacher", DEMO_TEACHER, "teacher-demo"),
])
def test_the_demo_size_fine_tuning_recipes_are_the_recipes_at_the_demo_sizes(recipe, base, overrides, from_scratch, tmp_path):
    """One recipe instead of seven overrides, at the recipes' rate rule: a quarter of the from-scratch rate."""
    path = [f"data.path={tmp_path}", f"teacher.checkpoint={tmp_path / 'w.pth'}"]  # the user supplies these
    cfg = load_config(recipe, path)
    assert cfg.to_dict() == load_config(base, [*path, *overrides]).to_dict()
    assert cfg.train.lr == pytest.approx(load_config(from_scratch).train.lr / 4)
