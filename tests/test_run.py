"""The run directory's metrics file after a crash: a torn last row is dropped, other damage named."""

from __future__ import annotations

import json
import re

import pytest

from cskd.errors import CSKDError
from cskd.run import RunDir


def _rows(*epochs: int) -> str:
    return "".join(json.dumps({"epoch": e, "loss": 1.0 / e}) + "\n" for e in epochs)


def test_a_row_torn_by_a_crash_is_dropped_when_the_rows_past_the_state_are(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / RunDir.METRICS).write_text(_rows(1, 2) + '{"epoch": 3, "lo')  # the append of epoch 3 cut short
    assert [r["epoch"] for r in run.metrics()] == [1, 2]
    run.truncate_metrics(2)
    assert (tmp_path / RunDir.METRICS).read_text() == _rows(1, 2)
    run.append_metrics({"epoch": 3, "loss": 1 / 3})  # the redone epoch's row lands on a line of its own
    assert [r["epoch"] for r in run.metrics()] == [1, 2, 3]


def test_an_unreadable_row_before_the_last_is_named_with_its_line(tmp_path):
    path = tmp_path / RunDir.METRICS
    path.write_text(_rows(1) + "not json\n" + _rows(2))
    with pytest.raises(CSKDError, match=re.escape(f"{path} line 2 is not JSON: 'not json'; delete or mend that line")):
        RunDir(tmp_path).truncate_metrics(2)
