"""Prometheus metrics of one app instance (its own registry: no global state between apps).

Requests are counted by route and status; everything a model does (batches, inference time, queue,
images, refusals) carries a ``model`` label, so several models on one server read apart. The shadow
teacher's series (``cskd_shadow_*``) come from the shadow process's report, the same on every worker
(:class:`cskd.serve.shadow.feed.ShadowCollector`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServeMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    batch_size: Histogram
    inference_seconds: Histogram
    queue_depth: Gauge
    images: Counter
    rejected: Counter


def create_metrics() -> ServeMetrics:
    registry = CollectorRegistry()
    return ServeMetrics(
        registry=registry,
        requests=Counter("cskd_http_requests_total", "HTTP requests by route and status code",
                         ["route", "method", "status"], registry=registry),
        request_seconds=Histogram("cskd_http_request_duration_seconds", "HTTP request latency by route",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry),
        batch_size=Histogram("cskd_batch_size_images", "images per inference call", ["model"], buckets=BATCH_BUCKETS,
                             registry=registry),
        inference_seconds=Histogram("cskd_inference_duration_seconds", "time of one inference call", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=registry),
        queue_depth=Gauge("cskd_queue_depth_images", "images waiting for inference", ["model"], registry=registry),
        images=Counter("cskd_images_total", "images classified", ["model"], registry=registry),
        rejected=Counter("cskd_rejected_images_total", "images refused by reason", ["model", "reason"], registry=registry),
    )
