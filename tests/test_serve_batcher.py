"""The dynamic batcher: a request runs at once on a free engine, what arrives meanwhile shares the
next call, a bad request fails alone, the queue is bounded, stale requests are dropped, one request
larger than a batch is sliced, and a stuck backend neither hangs a request nor shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cskd.serve.batcher import DeadlineExceeded, DynamicBatcher, InferenceTimeout, QueueFull


class Recorder:
    """A fake backend: logits = the rows' sums, and the batch sizes it saw."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes, self.delay = [], delay

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        import time

        time.sleep(self.delay)
        self.sizes.append(len(rows))
        return rows.reshape(len(rows), -1).sum(axis=1, keepdims=True)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_one_call_and_get_their_own_rows():
    async def scenario():
        backend = Recorder()
        batcher = DynamicBatcher(backend, max_batch=16, max_wait_ms=50, max_queue=64)
        batcher.start()
        requests = [np.full((n, 2), float(i)) for i, n in enumerate((1, 3, 2))]
        results = await asyncio.gather(*(batcher.submit(r, 5.0) for r in requests))
        await batcher.close()
        return backend.sizes, results

    sizes, results = run(scenario())
    assert sizes == [6]
    for i, (n, result) in enumerate(zip((1, 3, 2), results)):
        assert result.shape == (n, 1) and np.all(result == 2 * i)


def test_a_payload_that_fails_to_prepare_fails_only_its_own_request():
    def prepare(payload):
        if payload == "bad":
            raise ValueError("cannot decode")
        return np.full((1, 2), float(payload))

    async def scenario():
        batcher = DynamicBatcher(Recorder(), max_batch=8, max_wait_ms=50, max_queue=64)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(p, 5.0, count=1, prepare=prepare) for p in ("1", "bad", "3")),
                                        return_exceptions=True)
        await batcher.close()
        return outcomes

    good, bad, other = run(scenario())
    assert np.all(good == 2.0) and np.all(other == 6.0) and isinstance(bad, ValueError)


def test_a_request_on_a_free_engine_runs_at_once_and_later_ones_share_the_next_call():
    async def scenario():
        backend = Recorder(delay=0.2)
        batcher = DynamicBatcher(backend, max_batch=16, max_wait_ms=0, max_queue=64)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 5.0))
        await asyncio.sleep(0.05)  # the first call is running now
        assert backend.sizes == [] and batcher.depth == 0  # dispatched, not waiting for company
        later = [asyncio.ensure_future(batcher.submit(np.zeros((n, 2)), 5.0)) for n in (2, 3)]
        await asyncio.gather(first, *later)
        await batcher.close()
        return backend.sizes

    assert run(scenario()) == [1, 5]


def test_a_full_queue_refuses_at_once():
    async def scenario():
        batcher = DynamicBatcher(Recorder(delay=0.2), max_batch=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 5.0))  # takes the engine
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(batcher.submit(np.zeros((2, 2)), 5.0))  # fills the queue
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(np.zeros((1, 2)), 5.0)
        await asyncio.gather(running, queued)
        await batcher.close()

    run(scenario())


def test_a_request_queued_past_its_deadline_is_dropped():
    async def scenario():
        backend = Recorder(delay=0.3)
        batcher = DynamicBatcher(backend, max_batch=1, max_wait_ms=0, max_queue=8)
        batcher.start()
        slow = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(np.zeros((1, 2)), 0.1)  # waits behind the 0.3 s call
        await slow
        await batcher.close()
        return backend.sizes

    assert run(scenario()) == [1]  # the expired request never ran


def test_one_request_larger_than_a_batch_is_sliced():
    async def scenario():
        backend = Recorder()
        batcher = DynamicBatcher(backend, max_batch=4, max_wait_ms=0, max_queue=64)
        batcher.start()
        result = await batcher.submit(np.arange(20, dtype=float).reshape(10, 2), 5.0)
        await batcher.close()
        return backend.sizes, result

    sizes, result = run(scenario())
    assert sizes == [4, 4, 2] and np.array_equal(result[:, 0], np.arange(20).reshape(10, 2).sum(1))


def test_a_batch_runs_at_once_when_the_next_request_cannot_fit():
    async def scenario():
        backend = Recorder()
        batcher = DynamicBatcher(backend, max_batch=4, max_wait_ms=2000, max_queue=64)  # a long wait to fill
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(batcher.submit(np.zeros((3, 2)), 5.0))
        second = asyncio.ensure_future(batcher.submit(np.zeros((3, 2)), 5.0))
        await first
        elapsed = loop.time() - started
        await second  # waits to fill, then runs alone
        await batcher.close()
        return backend.sizes, elapsed

    sizes, elapsed = run(scenario())
    assert sizes == [3, 3] and elapsed < 1.0  # 3 + 3 > 4: the first batch did not wait the 2 s to fill


def test_an_empty_request_gets_an_empty_answer():
    async def scenario():
        batcher = DynamicBatcher(Recorder(), max_batch=4, max_wait_ms=0, max_queue=8)
        batcher.start()
        result = await batcher.submit(np.zeros((0, 2)), 5.0)
        await batcher.close()
        return result

    assert run(scenario()).shape[0] == 0


class Stuck:
    """A backend whose calls block until released: a hung GPU, a deadlocked runtime."""

    def __init__(self) -> None:
        import threading

        self.release, self.calls = threading.Event(), 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.release.wait(10)
        return rows.reshape(len(rows), -1).sum(axis=1, keepdims=True)


def test_a_stuck_backend_ends_every_request_by_its_deadline_and_marks_the_batcher_stalled():
    async def scenario():
        backend = Stuck()
        batcher = DynamicBatcher(backend, max_batch=1, max_wait_ms=0, max_queue=8, stall_after_s=0.3)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        in_call = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 0.5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 0.2))
        outcomes = await asyncio.gather(in_call, queued, return_exceptions=True)
        elapsed = loop.time() - started
        stalled = batcher.stalled  # 0.55 s into a call allowed 0.3 s
        await batcher.close(drain_s=0.2)  # returns although the call never does
        closed_after = loop.time() - started
        backend.release.set()
        return outcomes, elapsed, stalled, closed_after, batcher.depth, backend.calls

    (in_call, queued), elapsed, stalled, closed_after, depth, calls = run(scenario())
    assert isinstance(in_call, InferenceTimeout) and isinstance(queued, DeadlineExceeded)
    assert elapsed < 1.5 and closed_after < 2.0  # by their deadlines (0.5 s, 0.05 + 0.2 s), not the backend's 10 s
    assert stalled and depth == 0 and calls == 1  # the queued request was dropped, never run


def test_the_batcher_recovers_when_a_slow_call_returns():
    async def scenario():
        backend = Stuck()
        batcher = DynamicBatcher(backend, max_batch=4, max_wait_ms=0, max_queue=8, stall_after_s=0.1)
        batcher.start()
        with pytest.raises(InferenceTimeout):
            await batcher.submit(np.zeros((1, 2)), 0.2)
        assert batcher.stalled
        backend.release.set()  # the call comes back (late): its caller is gone, the next one is served
        result = await batcher.submit(np.full((2, 2), 3.0), 5.0)
        stalled_after = batcher.stalled
        await batcher.close()
        return result, stalled_after

    result, stalled_after = run(scenario())
    assert np.array_equal(result, [[6.0], [6.0]]) and not stalled_after


def test_close_answers_everything_accepted():
    async def scenario():
        backend = Recorder(delay=0.05)
        batcher = DynamicBatcher(backend, max_batch=2, max_wait_ms=1000, max_queue=64)  # a long fill window
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(np.full((1, 2), float(i)), 5.0)) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()  # does not wait out the window; runs what was accepted
        with pytest.raises(QueueFull):
            await batcher.submit(np.zeros((1, 2)), 5.0)
        return [float(p.result()[0, 0]) for p in pending], backend.sizes

    results, sizes = run(scenario())
    assert results == [0.0, 2.0, 4.0, 6.0, 8.0] and sizes == [2, 2, 1]


def test_a_request_its_caller_gave_up_on_is_never_run_and_close_does_not_wait_for_it():
    async def scenario():
        backend = Recorder()
        batcher = DynamicBatcher(backend, max_batch=4, max_wait_ms=100, max_queue=8)  # held in a fill window
        batcher.start()
        gone = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 5.0))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected
        await asyncio.sleep(0.2)  # the window closes on nothing to run
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.close(drain_s=5.0)
        return backend.sizes, batcher.depth, loop.time() - started

    sizes, depth, closing = run(scenario())
    assert sizes == [] and depth == 0 and closing < 1.0


def test_a_queued_request_whose_caller_left_frees_its_place_at_once():
    async def scenario():
        batcher = DynamicBatcher(Recorder(delay=0.3), max_batch=4, max_wait_ms=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.zeros((1, 2)), 5.0))  # takes the engine
        await asyncio.sleep(0.01)
        left = asyncio.ensure_future(batcher.submit(np.zeros((2, 2)), 5.0))  # fills the queue
        await asyncio.sleep(0.01)
        left.cancel()
        await asyncio.sleep(0.01)
        depth = batcher.depth
        after = await batcher.submit(np.full((2, 2), 1.0), 5.0)  # would be QueueFull while the ghost held its rows
        await running
        await batcher.close()
        return depth, after

    depth, after = run(scenario())
    assert depth == 0 and np.array_equal(after, [[2.0], [2.0]])


def test_cancelling_a_queued_array_request_behind_another_keeps_every_deadline():
    """A cancelled queue entry that is not the queue's head is removed by identity: its numpy payload
    is never compared with another's (that raised 'truth value of an array is ambiguous', left the
    entry queued, and made a later request's deadline timer fail, so it waited for the backend)."""

    async def scenario():
        backend = Stuck()
        batcher = DynamicBatcher(backend, max_batch=1, max_wait_ms=0, max_queue=16, stall_after_s=5.0)
        batcher.start()
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 2)), 0.4))  # holds the stuck engine
        await asyncio.sleep(0.01)
        q1 = asyncio.ensure_future(batcher.submit(np.ones((1, 2)), 0.4))
        q2 = asyncio.ensure_future(batcher.submit(np.ones((1, 2)), 0.4))
        await asyncio.sleep(0.01)
        q2.cancel()  # the client of a queued v2 request went away
        q3 = asyncio.ensure_future(batcher.submit(np.ones((1, 2)), 0.4))
        started = loop.time()
        outcomes = await asyncio.gather(running, q1, q2, q3, return_exceptions=True)
        elapsed = loop.time() - started
        depth = batcher.depth
        backend.release.set()
        await batcher.close(drain_s=1.0)
        return outcomes, elapsed, depth

    (running, q1, q2, q3), elapsed, depth = run(scenario())
    assert isinstance(running, InferenceTimeout) and isinstance(q1, DeadlineExceeded)
    assert isinstance(q2, asyncio.CancelledError)  # was: ValueError from deque.remove
    assert isinstance(q3, DeadlineExceeded) and elapsed < 1.5  # was: still waiting on the backend
    assert depth == 0
