"""Prometheus metrics of one app instance (its own registry: no global state between apps).

Requests are counted by route and status; everything a model does (batches, inference time, queue,
images, refusals) carries a ``model`` label, so several models on one server read apart; the shadow
teacher's comparison of the served student with its teacher has its own series (``cskd_shadow_*``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


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
    shadow_agreement: Gauge
    shadow_window: Gauge
    shadow_samples: Counter
    shadow_teacher_prob: Histogram
    shadow_queue: Gauge
    shadow_captured: Counter
    shadow_alert_threshold: Gauge


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
        shadow_agreement=Gauge("cskd_shadow_agreement", "top-1 agreement of the student with its shadow teacher over the "
                               "sliding window", ["student", "teacher"], registry=registry),
        shadow_window=Gauge("cskd_shadow_window_samples", "samples in the agreement window", ["student", "teacher"],
                            registry=registry),
        shadow_samples=Counter("cskd_shadow_samples_total", "shadow samples by outcome: agree, disagree, dropped "
                               "(the teacher could not keep up), failed", ["student", "teacher", "outcome"], registry=registry),
        shadow_teacher_prob=Histogram("cskd_shadow_teacher_probability", "the teacher's probability of the student's "
                                      "top-1 class", ["student", "teacher"], buckets=PROBABILITY_BUCKETS, registry=registry),
        shadow_queue=Gauge("cskd_shadow_queue_images", "sampled images waiting for the teacher", ["student", "teacher"],
                           registry=registry),
        shadow_captured=Counter("cskd_shadow_captured_total", "disagreeing images written to --shadow-capture, or skipped "
                                "(full, failed)", ["student", "teacher", "result"], registry=registry),
        # the server's --shadow-alert, so that an alerting rule compares the agreement with it (docker/alerts.yml)
        shadow_alert_threshold=Gauge("cskd_shadow_alert_threshold", "the agreement below which the server warns "
                                     "(--shadow-alert)", ["student", "teacher"], registry=registry),
    )
