"""Checkpoints: round trip with spec, plain timm keys, clear errors for foreign or damaged files."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from cskd.checkpoint import ModelSpec, load_weights, save_weights
from cskd.errors import CSKDError
from cskd.files import atomic_write
from cskd.models import create_teacher
from cskd.tasks import load_trained

SPEC = ModelSpec("student", "cskd_deit_nano_distilled_patch4_32", 10, 1, 32, 4,
                 {"embed_dim": 32, "depth": 1, "num_heads": 2}, (0.5,), (0.25,), [str(i) for i in range(10)])


def test_round_trip_rebuilds_the_same_model(tmp_path, tiny_student):
    save_weights(tmp_path / "w.safetensors", tiny_student.vit.state_dict(), SPEC, {"epoch": 3})
    trained = load_trained(tmp_path / "w.safetensors")
    model, spec, info = trained.model, trained.spec, trained.info
    assert spec == SPEC and info == {"epoch": 3}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_student.eval()(x))


def test_weights_use_plain_timm_keys(tmp_path, tiny_student):
    save_weights(tmp_path / "w.safetensors", tiny_student.vit.state_dict(), SPEC)
    tensors, _, _ = load_weights(tmp_path / "w.safetensors")
    vit = timm.create_model(SPEC.model, num_classes=10, in_chans=1, **SPEC.kwargs)
    vit.load_state_dict(tensors)  # strict


def test_foreign_safetensors_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CSKDError, match="not a cskd checkpoint"):
        load_weights(tmp_path / "f.safetensors")


def test_corrupted_file_is_refused(tmp_path, tiny_student):
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_student.vit.state_dict(), SPEC)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CSKDError, match="corrupted"):
        load_weights(path)


def test_run_dir_without_checkpoint_and_missing_file(tmp_path):
    with pytest.raises(CSKDError, match="holds no best.safetensors"):
        load_weights(tmp_path)
    with pytest.raises(CSKDError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_teacher_checkpoint_of_another_architecture_is_refused(tmp_path):
    teacher = create_teacher("cskd_resnet_micro", 10, 1)
    spec = ModelSpec("teacher", "cskd_resnet_micro", 10, 1, 32)
    save_weights(tmp_path / "t.safetensors", teacher.model.state_dict(), spec)
    with pytest.raises(CSKDError, match="set teacher.model=cskd_resnet_micro"):
        create_teacher("resnet18", 10, 1, checkpoint=tmp_path / "t.safetensors")


def test_plain_state_dict_of_wrong_shape_is_refused(tmp_path):
    teacher = create_teacher("cskd_resnet_micro", 10, 1)
    torch.save({"state_dict": teacher.model.state_dict()}, tmp_path / "t.pth")
    loaded = create_teacher("cskd_resnet_micro", 10, 1, checkpoint=tmp_path / "t.pth")  # plain .pth loads
    assert torch.equal(loaded.model.fc.weight, teacher.model.fc.weight)
    with pytest.raises(CSKDError, match="does not fit"):
        create_teacher("cskd_resnet_micro", 5, 1, checkpoint=tmp_path / "t.pth")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "good.bin"
    path.write_bytes(b"good")

    def failing_write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, failing_write)
    assert path.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
