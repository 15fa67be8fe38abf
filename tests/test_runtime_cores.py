import os

import pytest

from cskd.runtime import cores
from cskd.serve.app import engine_threads


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),  # compose's cpus: 2
    ({"cpu.max": "150000 100000"}, 2),  # 1.5 cores: two threads, each throttled a little
    ({"cpu.max": "50000 100000"}, 1),
    ({"cpu.max": "max 100000"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, 4),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),  # no cgroup files at all (not Linux, or not mounted)
])
def test_the_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cores.quota_cores(tmp_path) == expected


def test_usable_cores_are_the_affinity_bounded_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    (tmp_path / "cpu.max").write_text("200000 100000")
    assert cores.usable_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000")
    assert cores.usable_cores(tmp_path) == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    (tmp_path / "cpu.max").write_text("800000 100000")
    assert cores.usable_cores(tmp_path) == 1  # the mask is the tighter bound


@pytest.mark.parametrize("affinity, quota, models, workers, expected", [
    (2, None, 1, 1, None),  # one model, one worker, no quota: onnxruntime's default
    (64, 2, 1, 1, 2),  # a 64-core host under cpus: 2: two threads, not 64
    (4, None, 1, 2, 2),  # two workers share the cores
    (4, None, 2, 2, 1),
    (16, 8, 2, 2, 2),
    (2, None, 3, 2, 1),  # at least one each
])
def test_engine_threads_share_the_usable_cores_between_models_and_workers(monkeypatch, affinity, quota, models, workers, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cores, "quota_cores", lambda root=cores.CGROUP: quota)
    assert engine_threads(None, models, workers) == expected
    assert engine_threads(3, models, workers) == 3  # --threads is what each gets
