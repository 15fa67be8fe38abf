"""cskd eval: the packaged teacher reproduces the accuracy recorded when it was trained, and a
checkpoint is evaluated on the data it was trained on or not at all."""

from __future__ import annotations

import pytest
import torch

from cskd.assets import DEMO_TEACHER_CACHE, asset_path
from cskd.checkpoint import ModelSpec, load_weights, save_weights
from cskd.errors import CSKDError
from cskd.evaluate import format_table, run_eval
from cskd.models import create_teacher
from cskd.run import resolve_teacher_reference
from cskd.teacher_cache import CacheManifest
from tests.conftest import write_imagefolder


def test_packaged_teacher_reproduces_its_recorded_accuracy():
    _, spec, info = load_weights(resolve_teacher_reference("demo"))
    result = run_eval(resolve_teacher_reference("demo"), show_progress=False, workers=0)
    assert result["count"] == 2000 and result["role"] == "teacher"
    # metrics.jsonl of the run that made it recorded this top-1 on the same 2,000 images
    assert result["top1"]["global"] == pytest.approx(info["val_top1"], abs=1e-9)
    assert result["top1"]["global"] > 85.0
    assert "global" in format_table(result)
    # the packaged cache records the same figure (what demo runs report as their teacher's)
    cached = CacheManifest.read(asset_path(DEMO_TEACHER_CACHE))
    assert (cached.teacher_val_top1, cached.teacher_val_top5) == (result["top1"]["global"], result["top5"]["global"])


def test_a_checkpoint_outside_a_run_is_evaluated_on_the_demo_only_if_its_classes_are_the_demos(tmp_path):
    """A teacher of an image folder's classes c0-c9, copied out of its run: which data it belongs to
    is unknown, so it must be named; named wrongly, the classes say so."""
    write_imagefolder(tmp_path / "data", [(32, 32)])
    spec = ModelSpec("teacher", "cskd_resnet_micro", 10, 1, 32, kwargs={"output_stride": 8}, class_names=[f"c{i}" for i in range(10)])
    torch.manual_seed(0)
    save_weights(tmp_path / "teacher.safetensors", create_teacher("cskd_resnet_micro", 10, 1, output_stride=8).model.state_dict(), spec)
    with pytest.raises(CSKDError, match=r"not in a run directory, so the data it was trained on is unknown \(its classes: "
                                        r"c0, c1, c2, ...\); name it with --data"):
        run_eval(tmp_path / "teacher.safetensors", show_progress=False, workers=0)
    with pytest.raises(CSKDError, match="predicts the classes c0, c1, c2, ... but fashion-mnist-demo has T-shirt/top, Trouser"):
        run_eval(tmp_path / "teacher.safetensors", "fashion-mnist-demo", show_progress=False, workers=0)
    result = run_eval(tmp_path / "teacher.safetensors", "imagefolder", str(tmp_path / "data"), show_progress=False, workers=0)
    assert (result["data"], result["count"]) == ("imagefolder", 10)
