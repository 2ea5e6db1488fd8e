"""The service under K concurrent certify clients over HTTP: delivered noise samples/s as a fraction of L.

Each client sends certifications back to back, each with a new image and seed (never a cache
hit). After a warm-up, the window's sample count is the delta of the service's own counter
``certserve_noise_samples_total``. L is measured in this process right before and after each
K (the service idle), and the window is compared with their mean. During the largest K the
service's resident memory is sampled throughout the window.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from bench.client import Tally, fresh_bodies, noise_samples_now, start_clients, stop_clients, summarize, wait_idle
from bench.limit import Limit, limit_rate
from bench.memory import read_rss_mib, rss_trend


async def sample_rss(pid: int, seconds: float, interval_s: float) -> list[tuple[float, float]]:
    """RSS (MiB) of ``pid`` every ``interval_s`` for ``seconds``: [(seconds since start, rss_mib)]."""
    started = time.perf_counter()
    samples = []
    while True:
        elapsed = time.perf_counter() - started
        samples.append((elapsed, read_rss_mib(pid)["rss_mib"]))
        if elapsed >= seconds:
            return samples
        await asyncio.sleep(min(interval_s, seconds - elapsed))


async def certify_load(
    client: httpx.AsyncClient,
    limit: Limit,
    k: int,
    *,
    n0: int,
    n: int,
    alpha: float,
    warmup_s: float,
    window_s: float,
    rng: np.random.Generator,
    memory_pid: int | None = None,
    memory_interval_s: float = 5.0,
) -> dict[str, object]:
    """Run ``k`` closed-loop certify clients; the service's samples/s over the window (and RSS when asked)."""
    manifest = limit.manifest
    make_body = fresh_bodies(rng, manifest.input_shape, manifest.id, n0=n0, n=n, alpha=alpha)
    tally = Tally()
    tasks = start_clients(client, "/v1/certify", make_body, k, tally)
    rss: list[tuple[float, float]] = []
    try:
        await asyncio.sleep(warmup_s)
        t0, c0 = await noise_samples_now(client, manifest.id)
        if memory_pid is None:
            await asyncio.sleep(window_s)
        else:
            rss = await sample_rss(memory_pid, window_s, memory_interval_s)
        t1, c1 = await noise_samples_now(client, manifest.id)
    finally:
        await stop_clients(tasks)
    drain_s = await wait_idle(client, manifest.id)
    finished = tally.latencies_between(t0, t1)
    result: dict[str, object] = {
        "clients": k,
        "window_s": t1 - t0,
        "samples_per_s": (c1 - c0) / (t1 - t0),
        "certifications_finished_in_window": len(finished),
        "latency": summarize(finished),
        "errors": dict(tally.errors),
        "drain_s": drain_s,
    }
    if memory_pid is not None:
        result["memory"] = {
            "rss_series": [(round(t, 1), round(r, 1)) for t, r in rss],
            **rss_trend(rss),
            "peak_mib": read_rss_mib(memory_pid)["peak_mib"],
        }
    return result


async def measure_service(
    client: httpx.AsyncClient,
    limit: Limit,
    *,
    pid: int,
    ks: tuple[int, ...],
    n0: int,
    n: int,
    alpha: float,
    warmup_s: float,
    window_s: float,
    memory_s: float,
    memory_interval_s: float,
    limit_seconds: float,
    seed: int,
) -> dict[str, object]:
    """Delivered samples/s at each K as a fraction of L; the largest K runs ``memory_s`` and samples RSS."""
    rng = np.random.default_rng(seed)
    before = limit_rate(limit, limit_seconds)
    rows = []
    for k in ks:
        largest = k == max(ks)
        row = await certify_load(
            client,
            limit,
            k,
            n0=n0,
            n=n,
            alpha=alpha,
            warmup_s=warmup_s,
            window_s=memory_s if largest else window_s,
            rng=rng,
            memory_pid=pid if largest else None,
            memory_interval_s=memory_interval_s,
        )
        after = limit_rate(limit, limit_seconds)
        row["limit_samples_per_s"] = (before + after) / 2
        row["fraction_of_limit"] = row["samples_per_s"] / row["limit_samples_per_s"]
        rows.append(row)
        before = after
    return {"n0": n0, "n": n, "alpha": alpha, "loads": rows}
