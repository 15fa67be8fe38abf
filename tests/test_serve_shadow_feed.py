"""serve/shadow/feed.py and wire.py: a worker samples at its rate, never holds more than its byte bound,
and frames survive any split of the byte stream."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.feed import ShadowFeed
from cskd.serve.shadow.wire import FrameReader, encode_frame


class RecordingTransport:
    def __init__(self, buffered: int = 0) -> None:
        self.frames, self.buffered = [], buffered

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.frames.append(data)


def feed_for(rate: float, buffered: int = 0, seed: int = 0) -> ShadowFeed:
    feed = ShadowFeed("/nowhere", ServeSettings(model_dir="x", shadow_rate=rate), "s", "t", seed=seed)
    feed._transport = RecordingTransport(buffered)
    return feed


def test_images_are_sampled_at_the_rate():
    feed = feed_for(0.25)
    feed.offer([b"x"] * 400, False, np.zeros((400, 10), np.float32))
    sampled = len(feed._transport.frames)
    assert 400 * 0.25 - 4 * (400 * 0.25 * 0.75) ** 0.5 <= sampled <= 400 * 0.25 + 4 * (400 * 0.25 * 0.75) ** 0.5
    nothing = feed_for(0.0)
    nothing.offer([b"x"] * 400, False, np.zeros((400, 10), np.float32))  # offered, and none drawn
    assert nothing._transport.frames == [] and nothing.dropped_here == 0


def test_a_full_transport_drops_counts_and_tells_the_shadow_with_the_next_frame():
    feed = feed_for(1.0)
    feed._transport.buffered = feed.max_buffered - 10
    feed.offer([b"y" * 100] * 3, False, np.zeros((3, 10), np.float32))
    assert feed._transport.frames == [] and feed.dropped_here == 3
    feed._transport.buffered = 0
    rows = np.arange(2 * 12, dtype=np.float32).reshape(2, 1, 3, 4)
    feed.offer(rows, True, np.eye(2, 10, dtype=np.float32))
    frames = [f for data in feed._transport.frames for f in FrameReader().feed(data)]
    assert [h.get("dropped", 0) for h, _ in frames] == [3, 0]
    header, payload = frames[1]
    assert np.array_equal(np.frombuffer(payload, header["dtype"]).reshape(header["shape"]), rows[1])
    assert header["logits"] == np.eye(2, 10)[1].tolist()


@given(st.lists(st.tuples(st.dictionaries(st.text(max_size=5), st.integers()), st.binary(max_size=64)), max_size=6),
       st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_frames_round_trip_through_any_split_of_the_stream(messages, cuts):
    stream = b"".join(encode_frame(h, p) for h, p in messages)
    reader, received, at = FrameReader(), [], 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        received += list(reader.feed(stream[at:at + cut]))
        at += cut
    received += list(reader.feed(stream[at:]))
    assert received == messages and reader.pending == 0
