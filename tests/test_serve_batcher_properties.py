"""The dynamic batcher under random schedules (hypothesis): requests with numpy and bytes payloads,
cancels at every stage, short deadlines, a backend that stalls and comes back, the fill window on
and off, and close at any time. What must hold whatever the schedule:

* every request ends by its deadline (plus a small bound), whatever the backend does;
* a caller that cancels ends cancelled, never with another error;
* an answered request gets exactly its own rows' logits;
* the queue depth equals the rows of the requests still queued, and is 0 once all have ended;
* close answers everything it accepted, and refuses what comes after;
* nothing raises inside the event loop's callbacks (timers, the worker's reports).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cskd.serve.batcher import DeadlineExceeded, DynamicBatcher, InferenceTimeout, QueueFull

SLACK_S = 0.25  # how late past its deadline a request may end (timer and thread hand-off on a loaded CI core)
ENDED_BY_BATCHER = (DeadlineExceeded, InferenceTimeout, QueueFull)


class GatedBackend:
    """logits = each row's sum; ``stall()`` makes calls block until ``release()`` (a hung engine)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.rows_seen = 0

    def stall(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.open.wait(5.0)
        self.rows_seen += len(rows)
        return rows.reshape(len(rows), -1).sum(axis=1, keepdims=True)


def decode(payload: bytes) -> np.ndarray:
    """A bytes payload (what /predict queues) -> its rows, in the worker thread; b'bad' fails alone."""
    if payload == b"bad":
        raise ValueError("cannot decode")
    return np.frombuffer(payload, dtype=np.float64).reshape(-1, 2)


@dataclass
class Submit:
    kind: str  # "array" (v2 tensors, gRPC) or "bytes" (/predict images)
    rows: int
    value: float
    timeout_s: float


@dataclass
class Cancel:
    which: int  # index into the requests submitted so far (modulo their count)


@dataclass
class Sleep:
    seconds: float


@dataclass
class Stall:
    pass


@dataclass
class Release:
    pass


@dataclass
class Close:
    drain_s: float


@dataclass
class Request:
    op: Submit
    task: asyncio.Task
    submitted: float
    expected: Optional[np.ndarray]  # None: a payload that fails to decode
    cancel_took: bool = False
    ended: Optional[float] = None
    accepted_before_close: bool = True


@dataclass
class Schedule:
    max_batch: int
    max_wait_ms: float
    max_queue: int
    ops: List[object] = field(default_factory=list)


submits = st.builds(Submit, kind=st.sampled_from(["array", "bytes", "bad"]), rows=st.integers(0, 3),
                    value=st.integers(-5, 5).map(float), timeout_s=st.sampled_from([0.02, 0.05, 0.1, 0.3]))
operations = st.one_of(
    submits, submits, submits,
    st.builds(Cancel, which=st.integers(0, 50)),
    st.builds(Sleep, seconds=st.sampled_from([0.0, 0.001, 0.005, 0.02, 0.06])),
    st.just(Stall()), st.just(Release()),
    st.builds(Close, drain_s=st.sampled_from([0.02, 0.2])),
)
schedules = st.builds(Schedule, max_batch=st.integers(1, 4), max_wait_ms=st.sampled_from([0.0, 0.0, 3.0, 30.0]),
                      max_queue=st.integers(3, 8), ops=st.lists(operations, min_size=1, max_size=14))


def payload_of(op: Submit):
    rows = np.full((op.rows, 2), op.value)
    if op.kind == "array":
        return rows, len(rows), None
    if op.kind == "bad":
        return b"bad", op.rows, decode
    return rows.tobytes(), op.rows, decode


def queued_rows(batcher: DynamicBatcher) -> int:
    """The rows of the requests still waiting in the batcher's queue (its own record, read independently)."""
    return sum(p.count for p in batcher._queue if not p.future.done())


async def play(schedule: Schedule) -> List[str]:
    """Run ``schedule`` on a fresh batcher; returns every broken invariant (empty: all held)."""
    loop = asyncio.get_running_loop()
    broken: List[str] = []
    loop.set_exception_handler(lambda _, context: broken.append(f"raised in a loop callback: {context.get('exception')!r}"))
    backend = GatedBackend()
    batcher = DynamicBatcher(backend, schedule.max_batch, schedule.max_wait_ms, schedule.max_queue, stall_after_s=0.2)
    batcher.start()
    requests: List[Request] = []
    closing: Optional[asyncio.Task] = None

    def check_depth(when: str) -> None:
        if batcher.depth != queued_rows(batcher):
            broken.append(f"{when}: depth {batcher.depth} but {queued_rows(batcher)} rows are queued")

    for op in schedule.ops:
        if isinstance(op, Submit):
            payload, count, prepare = payload_of(op)
            expected = None if op.kind == "bad" else np.full((op.rows, 1), 2 * op.value)
            task = asyncio.ensure_future(batcher.submit(payload, op.timeout_s, count=count, prepare=prepare))
            requests.append(Request(op, task, time.monotonic(), expected, accepted_before_close=closing is None))
            task.add_done_callback(lambda _, r=requests[-1]: setattr(r, "ended", time.monotonic()))
            await asyncio.sleep(0)  # let it queue (or be refused)
        elif isinstance(op, Cancel) and requests:
            request = requests[op.which % len(requests)]
            request.cancel_took = request.task.cancel() or request.cancel_took
        elif isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
        elif isinstance(op, Stall):
            backend.stall()
        elif isinstance(op, Release):
            backend.release()
        elif isinstance(op, Close) and closing is None:
            closing = asyncio.ensure_future(batcher.close(drain_s=op.drain_s))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        check_depth(f"after {op}")

    longest = max((r.op.timeout_s for r in requests), default=0.0)
    if requests:
        await asyncio.wait([r.task for r in requests], timeout=longest + SLACK_S + 0.5)
    backend.release()
    if closing is None:
        closing = asyncio.ensure_future(batcher.close(drain_s=1.0))
    try:
        await asyncio.wait_for(closing, 3.0)
    except asyncio.TimeoutError:
        broken.append("close did not return")
    check_depth("after close")
    if batcher.depth != 0:
        broken.append(f"depth {batcher.depth} after everything ended")
    try:
        await batcher.submit(np.zeros((1, 2)), 1.0)
        broken.append("a request after close was accepted")
    except QueueFull:
        pass

    for i, r in enumerate(requests):
        name = f"request {i} ({r.op})"
        if not r.task.done():
            broken.append(f"{name} never ended")
            r.task.cancel()
            continue
        if r.ended - r.submitted > r.op.timeout_s + SLACK_S:
            broken.append(f"{name} ended {r.ended - r.submitted:.3f} s after it was submitted")
        if r.cancel_took:
            if not r.task.cancelled():
                broken.append(f"{name} was cancelled by its caller but ended with {r.task.exception()!r}")
            continue
        if r.task.cancelled():
            broken.append(f"{name} ended cancelled though nobody cancelled it")
            continue
        error = r.task.exception()
        if error is None:
            result = r.task.result()
            empty_alike = r.op.rows == 0 and result.size == 0  # no rows, no logits (their width is the engine's)
            if r.expected is None or not (empty_alike or np.array_equal(result, r.expected)):
                broken.append(f"{name} got {result.ravel().tolist()}, expected {r.expected}")
        elif isinstance(error, ValueError) and r.op.kind == "bad":
            pass  # its own payload failed to decode
        elif not isinstance(error, ENDED_BY_BATCHER):
            broken.append(f"{name} ended with {error!r}")
        elif isinstance(error, QueueFull) and r.accepted_before_close and r.op.rows <= schedule.max_queue \
                and "queued" not in str(error):
            broken.append(f"{name} was refused as if closing: {error}")
    return broken


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules)
def test_every_schedule_keeps_the_batchers_promises(schedule):
    broken = asyncio.run(play(schedule))
    assert not broken, "\n".join([f"schedule: {schedule}", *broken])
