"""Dynamic batching: concurrent requests share one inference call.

Each request submits its rows (images) and awaits a future. One collector task takes the first
waiting request, keeps taking more until ``max_batch`` rows or ``max_wait_ms`` have passed, runs
the backend in a worker thread (off the event loop), and hands every request its own rows back.
The queue is bounded in rows: a full queue refuses at once (the caller answers 503 with
Retry-After) instead of letting latency grow without bound, and a request still queued past its
deadline is dropped. ``close`` stops intake and drains what was accepted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional

import numpy as np


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already."""


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline and was dropped."""


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Optional[Callable[[int, float], None]] = None,
                 on_queue: Optional[Callable[[int], None]] = None) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_queue = on_queue or (lambda depth: None)
        self._queue: Deque[_Pending] = deque()
        self._rows_queued = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False

    @property
    def depth(self) -> int:
        return self._rows_queued

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, rows: np.ndarray, timeout_s: float) -> np.ndarray:
        """Queue ``rows`` (one request's images) and wait for their logits."""
        if self._closing:
            raise QueueFull("the server is shutting down")
        if self._rows_queued + len(rows) > self.max_queue:
            raise QueueFull(f"{self._rows_queued} images are queued (limit {self.max_queue})")
        pending = _Pending(rows, asyncio.get_running_loop().create_future(), time.perf_counter() + timeout_s)
        self._queue.append(pending)
        self._rows_queued += len(rows)
        self.on_queue(self._rows_queued)
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, stop the collector."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task

    def _take(self, batch: List[_Pending], rows: int) -> int:
        """Move queued requests into ``batch`` while they fit; drop the expired ones."""
        now = time.perf_counter()
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled() or now > head.deadline:
                self._queue.popleft()
                self._rows_queued -= len(head.rows)
                if not head.future.done():
                    head.future.set_exception(DeadlineExceeded(f"dropped after {now - head.enqueued:.1f} s in the queue"))
                continue
            if rows and rows + len(head.rows) > self.max_batch:
                break
            batch.append(self._queue.popleft())
            self._rows_queued -= len(head.rows)
            rows += len(head.rows)
        self.on_queue(self._rows_queued)
        return rows

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch: List[_Pending] = []
            rows = self._take(batch, 0)
            fill_until = time.perf_counter() + self.max_wait
            while rows < self.max_batch and not self._closing and (remaining := fill_until - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                rows = self._take(batch, rows)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: List[_Pending]) -> None:
        inputs = np.concatenate([p.rows for p in batch])
        try:
            outputs = await asyncio.to_thread(self._infer_chunks, inputs)
        except Exception as exc:  # the backend failed: every caller in the batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(outputs[offset : offset + len(p.rows)])
            offset += len(p.rows)

    def _infer_chunks(self, inputs: np.ndarray) -> np.ndarray:
        """Runs in the worker thread. One request may carry more than max_batch images: slice it."""
        outputs = []
        for i in range(0, len(inputs), self.max_batch):
            chunk = inputs[i : i + self.max_batch]
            start = time.perf_counter()
            outputs.append(self.infer(chunk))
            self.on_batch(len(chunk), time.perf_counter() - start)
        return np.concatenate(outputs)
