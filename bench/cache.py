"""Latency of a repeated certification answered from the certificate cache (Redis, or the in-process LRU).

One input is certified once without a seed (a miss, which fills the cache), then asked for again and
again: every repeat must come back with ``cached: true``.

The repeats go out on one connection of their own, opened by this part (bench.loadgen, the request
encoded once). Measured on the httpx client that had just served the mixed load, they took
~20 ms instead of ~2: that client's pool still held a few hundred keep-alive connections, and
httpcore scans them all for every request (bench/findings.md). The cache was never the cause.
"""

from __future__ import annotations

import numpy as np
import redis

from bench.client import image_body, summarize
from bench.inputs import random_pixels
from bench.loadgen import encode_json_post, sequential
from models.checkpoint import Manifest

WARMUP_HITS = 3


def redis_reachable(url: str) -> str | None:
    """None if Redis answers a ping at ``url``, else why not."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2.0) as r:
            r.ping()
    except (redis.RedisError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def flush_redis(url: str) -> None:
    """Empty the benchmark's Redis database (the URL names one, e.g. /12), before and after the measurement."""
    with redis.Redis.from_url(url, socket_timeout=2.0) as r:
        r.flushdb()


async def repeated_certify(
    url: str, manifest: Manifest, *, hits: int, n0: int, n: int, alpha: float, seed: int
) -> dict[str, object]:
    """Certify one new image from server randomness, then ``hits`` times more; latency of the repeats."""
    rng = np.random.default_rng(seed)
    pixels = random_pixels(rng, manifest.input_shape)
    request = encode_json_post(url, "/v1/certify", image_body(pixels, manifest.id, None, n0=n0, n=n, alpha=alpha))
    (miss_s,), (first,) = await sequential(url, request, 1)
    latencies, answers = await sequential(url, request, WARMUP_HITS + hits)
    if any(a.status != 200 for a in [first, *answers]):
        raise RuntimeError(f"certify answered {sorted({a.status for a in [first, *answers]})}: {answers[-1].body!r}")
    return {
        "n0": n0,
        "n": n,
        "first_request_ms": miss_s * 1000,
        "first_request_cached": first.json()["cached"],
        "repeats": summarize(latencies[WARMUP_HITS:]),
        "repeats_not_cached": sum(not a.json()["cached"] for a in answers),
    }
