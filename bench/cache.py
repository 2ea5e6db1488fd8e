"""Latency of a repeated certification answered from the certificate cache (Redis, or the in-process LRU).

One input is certified once without a seed (a miss, which fills the cache), then asked for again and
again: every repeat must come back with ``cached: true``.
"""

from __future__ import annotations

import httpx
import numpy as np
import redis

from bench.client import image_body, post, summarize
from bench.inputs import random_pixels
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
    client: httpx.AsyncClient, manifest: Manifest, *, hits: int, n0: int, n: int, alpha: float, seed: int
) -> dict[str, object]:
    """Certify one new image from server randomness, then ``hits`` times more; latency of the repeats."""
    rng = np.random.default_rng(seed)
    pixels = random_pixels(rng, manifest.input_shape)
    miss_s, first = await post(client, "/v1/certify", image_body(pixels, manifest.id, None, n0=n0, n=n, alpha=alpha))
    latencies = []
    not_cached = 0
    for i in range(WARMUP_HITS + hits):
        latency, answer = await post(
            client, "/v1/certify", image_body(pixels, manifest.id, None, n0=n0, n=n, alpha=alpha)
        )
        not_cached += not answer["cached"]
        if i >= WARMUP_HITS:
            latencies.append(latency)
    return {
        "n0": n0,
        "n": n,
        "first_request_ms": miss_s * 1000,
        "first_request_cached": first["cached"],
        "repeats": summarize(latencies),
        "repeats_not_cached": not_cached,
    }
