"""Dynamic batching: concurrent requests share one inference call.

Each request submits its work (encoded images, or engine-ready rows) and awaits a future. One
collector task takes the first waiting request, keeps taking more until ``max_batch`` rows or
``max_wait_ms`` have passed, then makes ONE trip to a worker thread that prepares every request's
rows (decoding images off the event loop, a bad image failing only its own request), runs the
backend and hands every request its own logits back.
The queue is bounded in rows: a full queue refuses at once (the caller answers 503 with
Retry-After) instead of letting latency grow without bound, and a request still queued past its
deadline is dropped. ``close`` stops intake and drains what was accepted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Union

import numpy as np


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already."""


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline and was dropped."""


Prepare = Callable[[Any], np.ndarray]  # a request's payload -> its engine-ready rows (runs in the worker)


@dataclass
class _Pending:
    payload: Any
    count: int  # rows the payload becomes
    prepare: Optional[Prepare]  # None: the payload already is the rows
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
        self._full = False  # the last _take stopped at a request that does not fit the batch

    @property
    def depth(self) -> int:
        return self._rows_queued

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, payload: Union[np.ndarray, Any], timeout_s: float, count: Optional[int] = None,
                     prepare: Optional[Prepare] = None) -> np.ndarray:
        """Queue one request's work and wait for its logits: engine-ready ``rows``, or a payload of
        ``count`` images that ``prepare`` turns into rows in the worker thread (its errors are raised here)."""
        count = len(payload) if count is None else count
        if self._closing:
            raise QueueFull("the server is shutting down")
        if self._rows_queued + count > self.max_queue:
            raise QueueFull(f"{self._rows_queued} images are queued (limit {self.max_queue})")
        pending = _Pending(payload, count, prepare, asyncio.get_running_loop().create_future(), time.perf_counter() + timeout_s)
        self._queue.append(pending)
        self._rows_queued += count
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
        self._full = False
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled() or now > head.deadline:
                self._queue.popleft()
                self._rows_queued -= head.count
                if not head.future.done():
                    head.future.set_exception(DeadlineExceeded(f"dropped after {now - head.enqueued:.1f} s in the queue"))
                continue
            if rows and rows + head.count > self.max_batch:
                self._full = True  # the next request does not fit: run this batch now
                break
            batch.append(self._queue.popleft())
            self._rows_queued -= head.count
            rows += head.count
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
            while rows < self.max_batch and not self._full and not self._closing \
                    and (remaining := fill_until - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                rows = self._take(batch, rows)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: List[_Pending]) -> None:
        try:
            results = await asyncio.to_thread(self._work, batch)
        except Exception as exc:  # the backend failed: every caller in the batch gets the error
            results = [exc] * len(batch)
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _work(self, batch: List[_Pending]) -> List[Union[np.ndarray, Exception]]:
        """Runs in the worker thread: prepare every request's rows, infer once (in slices of at
        most ``max_batch``: one request may carry more), split the logits back per request."""
        prepared: List[Union[np.ndarray, Exception]] = []
        for pending in batch:
            try:
                prepared.append(pending.prepare(pending.payload) if pending.prepare else pending.payload)
            except Exception as exc:  # this request's input is bad; the others still run
                prepared.append(exc)
        good = [rows for rows in prepared if not isinstance(rows, Exception)]
        if not good or sum(len(rows) for rows in good) == 0:
            return [rows if isinstance(rows, Exception) else rows[:0] for rows in prepared]
        inputs = np.concatenate(good) if len(good) > 1 else good[0]
        outputs = []
        for i in range(0, len(inputs), self.max_batch):
            chunk = inputs[i : i + self.max_batch]
            start = time.perf_counter()
            outputs.append(self.infer(chunk))
            self.on_batch(len(chunk), time.perf_counter() - start)
        logits = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        results, offset = [], 0
        for rows in prepared:
            if isinstance(rows, Exception):
                results.append(rows)
            else:
                results.append(logits[offset : offset + len(rows)])
                offset += len(rows)
        return results
