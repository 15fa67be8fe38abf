"""cskd eval: the packaged teacher reproduces the accuracy recorded when it was trained."""

from __future__ import annotations

import pytest

from cskd.checkpoint import load_weights
from cskd.evaluate import format_table, run_eval
from cskd.run import resolve_teacher_reference


def test_packaged_teacher_reproduces_its_recorded_accuracy():
    _, spec, info = load_weights(resolve_teacher_reference("demo"))
    result = run_eval(resolve_teacher_reference("demo"), show_progress=False, workers=0)
    assert result["count"] == 2000 and result["role"] == "teacher"
    # metrics.jsonl of the run that made it recorded this top-1 on the same 2,000 images
    assert result["top1"]["global"] == pytest.approx(info["val_top1"], abs=1e-9)
    assert result["top1"]["global"] > 85.0
    assert "global" in format_table(result)
