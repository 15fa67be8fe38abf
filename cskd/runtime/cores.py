"""How many cores this process may really use: the affinity mask, bounded by a container's CPU quota.

The affinity mask knows nothing of a quota: compose's ``cpus: 2`` on a 64-core host leaves 64 cores in
the mask and lets the process run for two cores' worth of time per period, so 64 onnxruntime threads
would be throttled in turn. cgroup v2 keeps the quota in ``cpu.max`` (``"200000 100000"``: quota and
period in microseconds, ``"max ..."`` for none), cgroup v1 in ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
(``-1``: none); a fractional quota rounds up (1.5 cores run two threads, each throttled a little).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

CGROUP = Path("/sys/fs/cgroup")


def affinity_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def quota_cores(root: Path = CGROUP) -> Optional[int]:
    """Cores' worth of CPU time the cgroup allows (rounded up), None without a quota."""
    quota = period = None
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = fields
    else:
        quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota), int(period)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def usable_cores(root: Path = CGROUP) -> int:
    quota = quota_cores(root)
    cores = affinity_cores()
    return min(cores, quota) if quota else cores
