"""Progress of long loops: a tqdm bar on a terminal, one summary line per phase in a log.

Off a terminal (CI, nohup, ``docker logs``, ``kubectl logs``) a tqdm bar writes every redraw into
the log as a carriage-return frame: hundreds of KB per training epoch. There :func:`progress`
returns a :class:`LineProgress` instead, which counts silently and prints one line when the phase
ends. Both answer ``update``, ``set_postfix``, ``close`` and ``with``, so loops never ask which.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO, Union

from tqdm import tqdm


class LineProgress:
    """A progress bar's interface that writes one summary line on ``close`` (nothing when not ``enabled``)."""

    def __init__(self, total: Optional[int], desc: str, unit: str, file: TextIO, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.file, self.enabled = total, desc, unit, file, enabled
        self.n = 0
        self.postfix: Dict[str, Any] = {}
        self._start = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Optional[Dict[str, Any]] = None, refresh: bool = True, **values: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **values}  # tqdm's signature; only the latest is shown

    def summary(self) -> str:
        elapsed = time.perf_counter() - self._start
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit} in {elapsed:.1f}s ({rate:.1f} {self.unit}/s){extra}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            print(self.summary(), file=self.file, flush=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on an exception: the log shows where the phase stopped


Progress = Union[tqdm, LineProgress]


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True, leave: bool = False,
             file: Optional[TextIO] = None) -> Progress:
    """A tqdm bar on ``file`` (default stderr) when it is a terminal, else a :class:`LineProgress`;
    with ``enabled`` false, an object that shows nothing (``--no-progress``, non-main ranks)."""
    stream = file if file is not None else sys.stderr
    if enabled and is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, stream, enabled)
