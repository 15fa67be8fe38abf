"""A worker's side of the shadow: draw samples, send them to the shadow process, answer with its report.

``offer`` runs on the event loop after the student has answered: one random draw per image and, when
drawn, one write into the socket's transport (no lock, no thread, no wait). A sample the transport cannot
take within its byte bound (the shadow process is behind) is dropped and counted, and the count travels
with the next frame, so the shadow's report holds every worker's drops.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from typing import Any, Dict, List, Optional, Union

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.wire import FrameError, FrameReader, encode_frame

logger = logging.getLogger("cskd.serve.shadow")

RECONNECT_S = 1.0


class _Connection(asyncio.Protocol):
    def __init__(self, feed: "ShadowFeed") -> None:
        self.feed, self.reader = feed, FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            for header, _ in self.reader.feed(data):
                if header.get("t") == "report":
                    self.feed.latest = header["report"]
                    self.feed.reported.set()
        except FrameError as exc:
            logger.warning("shadow: unreadable report (%s)", exc)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.feed._lost()


class ShadowFeed:
    """Samples ``rate`` of the watched model's images for the shadow process at ``socket_path``."""

    def __init__(self, socket_path: str, settings: ServeSettings, student: str, teacher: str, seed: Optional[int] = None) -> None:
        self.socket_path, self.settings, self.student, self.teacher = socket_path, settings, student, teacher
        self.rate = settings.shadow_rate
        # this worker's share of the bytes in flight to the shadow (the shadow's own queue holds as many again)
        self.max_buffered = max(1 << 20, settings.shadow_queue_bytes // max(1, settings.workers))
        self._random = random.Random(seed)
        self._transport: Optional[asyncio.Transport] = None
        self.unsent_drops = 0  # dropped here, not yet told to the shadow
        self.dropped_here = 0
        self.latest: Optional[Dict[str, Any]] = None
        self.reported = asyncio.Event()
        self._closing = False
        self._reconnect: Optional[asyncio.Task] = None

    async def connect(self, timeout_s: float) -> bool:
        """Connect, and wait for the shadow's first report, within ``timeout_s``; retried in the background after."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._closing:
            if await self._try_connect():
                try:
                    await asyncio.wait_for(self.reported.wait(), max(0.1, deadline - time.monotonic()))
                    return True
                except asyncio.TimeoutError:
                    break
            await asyncio.sleep(0.1)
        self._schedule_reconnect()
        return False

    async def _try_connect(self) -> bool:
        try:
            self._transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: _Connection(self), self.socket_path)
            return True
        except OSError:
            return False

    def _lost(self) -> None:
        self._transport = None
        if not self._closing:
            logger.warning("shadow: lost the shadow process; its samples are dropped until it is back")
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while self._transport is None and not self._closing:
            await asyncio.sleep(RECONNECT_S)
            await self._try_connect()

    def offer(self, payload: Union[List[bytes], np.ndarray], rows: bool, logits: np.ndarray) -> None:
        """The student answered ``payload`` (encoded images, or engine rows when ``rows``) with ``logits``."""
        for i in range(len(logits)):
            if self._random.random() >= self.rate:
                continue
            header: Dict[str, Any] = {"t": "sample", "logits": logits[i].tolist(), "time": time.time()}
            if rows:
                row = np.ascontiguousarray(payload[i])
                header.update(kind="rows", dtype=row.dtype.str, shape=list(row.shape))
                data = row.tobytes()
            else:
                header["kind"], data = "image", bytes(payload[i])
            transport = self._transport
            if transport is None or transport.is_closing() or transport.get_write_buffer_size() + len(data) > self.max_buffered:
                self.unsent_drops += 1
                self.dropped_here += 1
                continue
            if self.unsent_drops:
                header["dropped"], self.unsent_drops = self.unsent_drops, 0
            transport.write(encode_frame(header, data))

    async def close(self) -> None:
        """Tell the shadow the last drops and let the transport drain."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        transport = self._transport
        if transport is not None:
            if self.unsent_drops:
                transport.write(encode_frame({"t": "drops", "dropped": self.unsent_drops}))
                self.unsent_drops = 0
            for _ in range(100):
                if transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.01)
            transport.close()

    def report(self) -> Dict[str, Any]:
        """The shadow's latest report, with the drops this worker has not told it yet."""
        report = copy.deepcopy(self.latest) if self.latest else self._empty()
        report["samples"]["dropped"] += self.unsent_drops
        report["connected"] = self._transport is not None
        return report

    def _empty(self) -> Dict[str, Any]:
        return {"student": self.student, "teacher": self.teacher, "rate": self.rate, "remote": self.settings.shadow_url,
                "teacher_status": {"where": "starting", "reachable": False},
                "window": {"size": self.settings.shadow_window, "samples": 0, "agreement": None},
                "alert": {"threshold": self.settings.shadow_alert, "firing": False, "warnings": 0,
                          "source": "--shadow-alert" if self.settings.shadow_alert is not None else None},
                "samples": {"agree": 0, "disagree": 0, "dropped": 0, "failed": 0}, "queued": 0, "queued_bytes": 0,
                "queue_limit": {"images": self.settings.shadow_queue, "bytes": self.settings.shadow_queue_bytes},
                "teacher_probability_of_student_top1": {"mean": None, "histogram": None}, "classes": [],
                "confusion": None, "capture": None}


class ShadowCollector:
    """The ``cskd_shadow_*`` series, read from the shadow's latest report: the same on every worker."""

    def __init__(self, feed: ShadowFeed) -> None:
        self.feed = feed

    def collect(self):
        report = self.feed.report()
        labels = ["student", "teacher"]
        values = [report["student"], report["teacher"]]

        def gauge(name: str, documentation: str, value: Optional[float]):
            family = GaugeMetricFamily(name, documentation, labels=labels)
            if value is not None:
                family.add_metric(values, value)
            return family

        yield gauge("cskd_shadow_agreement", "top-1 agreement of the student with its shadow teacher over the sliding window",
                    report["window"]["agreement"])
        yield gauge("cskd_shadow_window_samples", "samples in the agreement window", report["window"]["samples"])
        yield gauge("cskd_shadow_queue_images", "sampled images waiting for the teacher", report["queued"])
        alert = report["alert"]
        threshold = GaugeMetricFamily("cskd_shadow_alert_threshold", "the agreement below which the server warns: "
                                      "--shadow-alert, else the package's certified agreement (robustness.json) less 3 "
                                      "standard errors of the window; source says which", labels=[*labels, "source"])
        if alert["threshold"] is not None:
            threshold.add_metric([*values, alert.get("source") or ""], alert["threshold"])
        yield threshold
        samples = CounterMetricFamily("cskd_shadow_samples", "shadow samples by outcome: agree, disagree, dropped "
                                      "(the teacher could not keep up), failed", labels=[*labels, "outcome"])
        for outcome, count in report["samples"].items():
            samples.add_metric([*values, outcome], count)
        yield samples
        captured = CounterMetricFamily("cskd_shadow_captured", "disagreeing images written to --shadow-capture, or skipped "
                                       "(full, failed)", labels=[*labels, "result"])
        for result, count in ((report.get("capture") or {}).get("results") or {}).items():
            captured.add_metric([*values, result], count)
        yield captured
        histogram = report["teacher_probability_of_student_top1"].get("histogram")
        family = HistogramMetricFamily("cskd_shadow_teacher_probability", "the teacher's probability of the student's "
                                       "top-1 class", labels=labels)
        if histogram:
            cumulative, buckets = 0, []
            for bound, count in zip([*histogram["buckets"], float("inf")], histogram["counts"]):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            family.add_metric(values, buckets, histogram["sum"])
        yield family
