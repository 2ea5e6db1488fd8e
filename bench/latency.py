"""Latency of /v1/predict (n = 100): idle, while certifications saturate the device, and as concurrency grows.

The predictions go out through ``bench.loadgen`` (requests encoded before the clock, raw keep-alive
connections of their own), not the benchmark's httpx client: that client shares the two cores with the
service, spends ~2.5 ms of CPU per request, and by this part holds the K = 64 run's pooled connections,
which it scans for every request (bench/findings.md). The saturating certifications, a few per second,
still use httpx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import numpy as np

from bench.client import (
    Tally,
    fresh_bodies,
    noise_samples_now,
    start_clients,
    stop_clients,
    summarize,
    wait_idle,
)
from bench.limit import Limit, limit_rate
from bench.loadgen import Answer, closed_loop, encode_json_post, sequential_each

WARMUP_REQUESTS = 3  # not counted: first connections, first allocations
KNEE_SHARE = 0.9  # the knee: the fewest clients that reach 90 % of the best throughput of the sweep


def predict_requests(url: str, limit: Limit, *, n: int, alpha: float, rng: np.random.Generator) -> Callable[[], bytes]:
    """A maker of encoded /v1/predict requests, each with a new random image and a client seed (never cached)."""
    make_body = fresh_bodies(rng, limit.manifest.input_shape, limit.manifest.id, n=n, alpha=alpha)
    return lambda: encode_json_post(url, "/v1/predict", make_body())


async def sequential_predicts(
    client: httpx.AsyncClient, limit: Limit, count: int, *, n: int, alpha: float, rng: np.random.Generator
) -> list[float]:
    """Latencies (s) of ``count`` predicts sent one after another on one connection (encoded beforehand)."""
    make_request = predict_requests(str(client.base_url), limit, n=n, alpha=alpha, rng=rng)
    requests = [make_request() for _ in range(WARMUP_REQUESTS + count)]
    latencies, answers = await sequential_each(str(client.base_url), requests)
    failed = sorted({a.status for a in answers if a.status != 200})
    if failed:
        raise RuntimeError(f"/v1/predict answered {failed}")
    return latencies[WARMUP_REQUESTS:]


async def saturated_predicts(
    client: httpx.AsyncClient,
    limit: Limit,
    count: int,
    *,
    n: int,
    certifiers: int,
    n0: int,
    certify_n: int,
    alpha: float,
    warmup_s: float,
    limit_seconds: float,
    rng: np.random.Generator,
) -> dict[str, object]:
    """Sequential predicts while ``certifiers`` closed-loop certify clients keep the device busy."""
    manifest = limit.manifest
    before = limit_rate(limit, limit_seconds)
    tally = Tally()
    make_certify = fresh_bodies(rng, manifest.input_shape, manifest.id, n0=n0, n=certify_n, alpha=alpha)
    tasks = start_clients(client, "/v1/certify", make_certify, certifiers, tally)
    try:
        await asyncio.sleep(warmup_s)
        t0, c0 = await noise_samples_now(client, manifest.id)
        latencies = await sequential_predicts(client, limit, count, n=n, alpha=alpha, rng=rng)
        t1, c1 = await noise_samples_now(client, manifest.id)
    finally:
        await stop_clients(tasks)
    await wait_idle(client, manifest.id)
    after = limit_rate(limit, limit_seconds)
    device_rate = (c1 - c0) / (t1 - t0)
    return {
        "certify_clients": certifiers,
        "certify_n": certify_n,
        "predict": summarize(latencies),
        "device_samples_per_s": device_rate,
        "device_fraction_of_limit": device_rate / ((before + after) / 2),
        "certify_errors": dict(tally.errors),
    }


async def predict_sweep_point(
    client: httpx.AsyncClient,
    limit: Limit,
    clients: int,
    *,
    n: int,
    alpha: float,
    window_s: float,
    rng: np.random.Generator,
) -> dict[str, object]:
    """``clients`` closed-loop predict clients for ``window_s``: answers/s and latency of the answers in the window."""
    manifest = limit.manifest
    tally = Tally()
    make_request = predict_requests(str(client.base_url), limit, n=n, alpha=alpha, rng=rng)

    def record(answer: Answer, latency: float) -> None:
        if answer.status == 200:
            tally.answers.append((time.perf_counter(), latency))
        else:
            tally.errors[f"HTTP {answer.status}"] += 1

    tasks = [asyncio.create_task(closed_loop(str(client.base_url), make_request, record)) for _ in range(clients)]
    try:
        await asyncio.sleep(min(1.0, window_s / 4))  # warm-up: every client has sent its first request
        t0 = time.perf_counter()
        await asyncio.sleep(window_s)
        t1 = time.perf_counter()
    finally:
        await stop_clients(tasks)
    await wait_idle(client, manifest.id)
    finished = tally.latencies_between(t0, t1)
    return {
        "clients": clients,
        "predicts_per_s": len(finished) / (t1 - t0),
        "samples_per_s": len(finished) * n / (t1 - t0),
        **{k: v for k, v in summarize(finished).items() if k != "count"},
        "answers": len(finished),
        "errors": dict(tally.errors),
    }


def knee(points: list[dict[str, object]]) -> int | None:
    """The fewest clients whose throughput reaches KNEE_SHARE of the sweep's best: more only adds latency."""
    if not points:
        return None
    best = max(float(p["predicts_per_s"]) for p in points)
    return min(int(p["clients"]) for p in points if float(p["predicts_per_s"]) >= KNEE_SHARE * best)


async def measure_latency(
    client: httpx.AsyncClient,
    limit: Limit,
    *,
    n: int,
    alpha: float,
    idle_count: int,
    saturated_count: int,
    certifiers: int,
    n0: int,
    certify_n: int,
    warmup_s: float,
    sweep: tuple[int, ...],
    sweep_window_s: float,
    limit_seconds: float,
    seed: int,
) -> dict[str, object]:
    """Predict latency idle vs saturated (the ratio of p99s), and the throughput/latency sweep with its knee."""
    rng = np.random.default_rng(seed)
    idle = summarize(await sequential_predicts(client, limit, idle_count, n=n, alpha=alpha, rng=rng))
    saturated = await saturated_predicts(
        client,
        limit,
        saturated_count,
        n=n,
        certifiers=certifiers,
        n0=n0,
        certify_n=certify_n,
        alpha=alpha,
        warmup_s=warmup_s,
        limit_seconds=limit_seconds,
        rng=rng,
    )
    points = [
        await predict_sweep_point(client, limit, c, n=n, alpha=alpha, window_s=sweep_window_s, rng=rng) for c in sweep
    ]
    return {
        "predict_n": n,
        "predict_client": "bench.loadgen",
        "idle": idle,
        "saturated": saturated,
        "p99_saturated_over_idle": saturated["predict"]["p99_ms"] / idle["p99_ms"],
        "p50_saturated_over_idle": saturated["predict"]["p50_ms"] / idle["p50_ms"],
        "sweep": points,
        "knee_clients": knee(points),
        "knee_rule": f"fewest clients reaching {KNEE_SHARE:.0%} of the sweep's best predicts/s",
    }
