"""``cskd bench http URL``: N concurrent clients against a running ``cskd serve``, bounded in time.

Each client posts one image per request to ``/predict`` in a loop until the duration is over.
Reports throughput, latency percentiles and errors by status; loopback or your own hosts only.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from typing import Dict, List, Optional

import httpx
import numpy as np
from PIL import Image

from cskd.assets import demo_arrays


def demo_image_png() -> bytes:
    """The first embedded validation image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(demo_arrays("val")[0][0], mode="L").save(buf, format="PNG")
    return buf.getvalue()


async def _client(client, url: str, payload: bytes, stop_at: float, latencies: List[float], statuses: Counter,
                  headers: Dict[str, str]) -> None:
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            response = await client.post(url, files={"files": ("image.png", payload, "image/png")}, headers=headers)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1


async def run_load(base_url: str, image: bytes, concurrency: int, duration_s: float, api_key: Optional[str] = None,
                   timeout_s: float = 30.0) -> Dict:
    url = base_url.rstrip("/") + "/predict"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: List[float] = []
    statuses: Counter = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(*(_client(client, url, image, stop_at, latencies, statuses, headers) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    pct = (lambda q: 1000 * float(np.percentile(latencies, q))) if latencies else (lambda q: float("nan"))
    return {
        "url": url, "concurrency": concurrency, "duration_s": round(elapsed, 2), "requests": sum(statuses.values()),
        "ok": ok, "errors": sum(statuses.values()) - ok, "by_status": {str(k): v for k, v in statuses.items()},
        "throughput_rps": ok / elapsed, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
    }


def format_load(result: Dict) -> str:
    return (f"{result['url']}: {result['concurrency']} clients for {result['duration_s']} s: {result['ok']} ok, "
            f"{result['errors']} errors {result['by_status']}; {result['throughput_rps']:.1f} req/s, "
            f"p50 {result['p50_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
