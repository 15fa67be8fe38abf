"""Dynamic batching: concurrent requests share one inference call, and no request waits for company.

Each request submits its work (encoded images, or engine-ready rows) and awaits a future. When the
engine is free, a request is dispatched at once; requests that arrive while a batch runs queue up
and form the next batch (up to ``max_batch`` rows) the moment the engine is free again. That is
Triton's dynamic batcher with no queue delay, its default: at low load nothing waits, at high load
batches grow by themselves. A fill window (``max_wait_ms`` > 0) holds a batch open after its first
request, for engines whose throughput grows a lot with batch size.

A batch runs in one dedicated worker thread that prepares every request's rows (decoding images
off the event loop; a bad image fails only its own request), runs the backend once and hands each
request its own logits. Every request ends by its deadline: still queued, it is dropped
(:class:`DeadlineExceeded`); inside a batch that has not come back, it fails with
:class:`InferenceTimeout` while the batch runs on. A call that outlives a request's whole deadline
marks the batcher :attr:`stalled` (the server turns unready). The queue is bounded in rows: a full
queue refuses at once. ``close`` stops intake, drains what was accepted within a bound, and never
hangs on a stuck backend (the worker is a daemon thread).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Union

import numpy as np


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already, or the batcher is closing."""


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline and was dropped."""


class InferenceTimeout(Exception):
    """The request's batch did not come back from the backend by the request's deadline."""


Prepare = Callable[[Any], np.ndarray]  # a request's payload -> its engine-ready rows (runs in the worker)
Outcome = Union[np.ndarray, Exception]


@dataclass(eq=False)  # a queue entry is itself, never equal to another: payloads (numpy rows) do not compare
class _Pending:
    payload: Any
    count: int  # rows the payload becomes
    prepare: Optional[Prepare]  # None: the payload already is the rows
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True  # False once taken into a batch


class _Worker:
    """One daemon thread that runs batches in turn and reports each back on the event loop.

    Daemon, so a backend call that never returns cannot keep the process from exiting; one thread,
    because the engine runs one batch at a time and its own threads parallelise inside a call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="cskd-inference", daemon=True).start()

    def run(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self._jobs.put((fn, done))

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                result = fn()
            except Exception as exc:  # the backend failed: the batch's callers get the error
                result = exc
            try:
                self._loop.call_soon_threadsafe(done, result)
            except RuntimeError:  # the loop closed while this call ran: nobody is waiting any more
                return


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Optional[Callable[[int, float], None]] = None,
                 on_queue: Optional[Callable[[int], None]] = None,
                 stall_after_s: float = 10.0) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.stall_after_s = max_queue, stall_after_s
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_queue = on_queue or (lambda depth: None)
        self._queue: Deque[_Pending] = deque()
        self._rows_queued = 0
        self._busy_since: Optional[float] = None  # when the batch in the worker was dispatched
        self._window: Optional[asyncio.TimerHandle] = None  # the fill window of the queue's head
        self._closing = False
        self._idle: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._worker: Optional[_Worker] = None

    @property
    def depth(self) -> int:
        return self._rows_queued

    @property
    def stalled(self) -> bool:
        """A backend call has run longer than a request may wait: nothing will be answered in time."""
        return self._busy_since is not None and time.monotonic() - self._busy_since > self.stall_after_s

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = _Worker(self._loop)
        self._idle = asyncio.Event()
        self._idle.set()

    async def submit(self, payload: Union[np.ndarray, Any], timeout_s: float, count: Optional[int] = None,
                     prepare: Optional[Prepare] = None) -> np.ndarray:
        """Queue one request's work and wait for its logits: engine-ready ``rows``, or a payload of
        ``count`` images that ``prepare`` turns into rows in the worker thread (its errors are raised
        here). Ends by ``timeout_s`` whatever the backend does."""
        count = len(payload) if count is None else count
        if self._closing:
            raise QueueFull("the server is shutting down")
        if self._rows_queued + count > self.max_queue:
            raise QueueFull(f"{self._rows_queued} images are queued (limit {self.max_queue})")
        pending = _Pending(payload, count, prepare, self._loop.create_future())
        self._queue.append(pending)
        self._rows_queued += count
        self._idle.clear()
        self.on_queue(self._rows_queued)
        self._dispatch()
        deadline = self._loop.call_later(timeout_s, self._expire, pending)
        try:
            return await pending.future
        finally:
            deadline.cancel()
            if pending.queued and pending.future.cancelled():  # its caller went away: free its place now
                self._unqueue(pending)

    async def close(self, drain_s: float = 30.0) -> None:
        """Refuse new work, answer everything accepted (within ``drain_s``), stop the worker."""
        self._closing = True
        if self._idle is None:
            return
        self._dispatch()  # a fill window still open: run it now
        try:
            await asyncio.wait_for(self._idle.wait(), drain_s)
        except asyncio.TimeoutError:  # a stuck backend: give up on what is left rather than hang
            self._fail_all(InferenceTimeout(f"the server shut down after waiting {drain_s:g} s for the backend"))
        self._worker.stop()

    def _dispatch(self, window_over: bool = False) -> None:
        """Start the next batch if the engine is free and the queue holds work (and its fill window,
        if any, is over or the batch is full)."""
        if window_over:
            self._window = None
        if self._busy_since is not None or not self._queue:
            self._settle()
            return
        if self.max_wait > 0 and not (window_over or self._closing) and self._rows_queued < self.max_batch:
            if self._window is None:
                wait = self._queue[0].enqueued + self.max_wait - time.monotonic()
                self._window = self._loop.call_later(max(wait, 0.0), self._dispatch, True)
            return
        if self._window is not None:
            self._window.cancel()
            self._window = None
        batch = self._take()
        if batch:
            self._busy_since = time.monotonic()
            self._worker.run(lambda: self._work(batch), lambda results: self._finish(batch, results))
        self._settle()  # every request taken may have been cancelled by its caller

    def _take(self) -> List[_Pending]:
        """The queue's head requests that fit ``max_batch`` rows (a larger request goes alone, sliced)."""
        batch: List[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if rows and rows + head.count > self.max_batch:
                break
            self._queue.popleft()
            self._rows_queued -= head.count
            head.queued = False
            if head.future.done():  # cancelled by its caller
                continue
            batch.append(head)
            rows += head.count
        self.on_queue(self._rows_queued)
        return batch

    def _finish(self, batch: List[_Pending], results: Union[List[Outcome], Exception]) -> None:
        """On the event loop: hand each request its outcome, then start the next batch."""
        self._busy_since = None
        if isinstance(results, Exception):
            results = [results] * len(batch)
        for pending, result in zip(batch, results):
            if pending.future.done():  # its deadline passed meanwhile
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        self._dispatch()

    def _expire(self, pending: _Pending) -> None:
        """The request's deadline: drop it from the queue, or stop waiting for its batch."""
        if pending.future.done():
            return
        waited = time.monotonic() - pending.enqueued
        if pending.queued:
            self._unqueue(pending)
            pending.future.set_exception(DeadlineExceeded(f"dropped after {waited:.1f} s in the queue"))
        else:
            pending.future.set_exception(InferenceTimeout(
                f"inference did not finish within {waited:.1f} s (the backend has been busy with this batch for "
                f"{time.monotonic() - self._busy_since:.1f} s)"))

    def _unqueue(self, pending: _Pending) -> None:
        self._queue.remove(pending)
        pending.queued = False
        self._rows_queued -= pending.count
        self.on_queue(self._rows_queued)
        self._settle()

    def _settle(self) -> None:
        """Nothing running and nothing queued: ``close`` may return."""
        if self._busy_since is None and not self._queue:
            self._idle.set()

    def _fail_all(self, error: Exception) -> None:
        while self._queue:
            pending = self._queue.popleft()
            pending.queued = False
            if not pending.future.done():
                pending.future.set_exception(error)
        self._rows_queued = 0
        self.on_queue(0)

    def _work(self, batch: List[_Pending]) -> List[Outcome]:
        """Runs in the worker thread: prepare every request's rows, infer once (in slices of at
        most ``max_batch``: one request may carry more), split the logits back per request."""
        prepared: List[Outcome] = []
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
        results: List[Outcome] = []
        offset = 0
        for rows in prepared:
            if isinstance(rows, Exception):
                results.append(rows)
            else:
                results.append(logits[offset : offset + len(rows)])
                offset += len(rows)
        return results
