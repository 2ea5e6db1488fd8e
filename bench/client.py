"""HTTP clients of the service (httpx, asyncio): request bodies, closed-loop clients, metrics scraping."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.inputs import png_base64, random_pixels

REQUEST_TIMEOUT_S = 900.0  # a 64-client certification round on a CPU takes minutes
BUSY_BACKOFF_S = 0.2  # after a 503 (queue full), before trying again

Body = dict[str, object]


@dataclass
class Tally:
    """What a group of clients saw: (finish time, latency) of each answer, and errors by kind."""

    answers: list[tuple[float, float]] = field(default_factory=list)  # (time.perf_counter() at finish, seconds)
    errors: Counter[str] = field(default_factory=Counter)

    def latencies_between(self, start: float, stop: float) -> list[float]:
        """Latencies (s) of the answers that finished in [start, stop]."""
        return [latency for finish, latency in self.answers if start <= finish <= stop]


def new_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=REQUEST_TIMEOUT_S,
        trust_env=False,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )


def image_body(pixels: np.ndarray, model_id: str, seed: int | None, **params: object) -> Body:
    """A JSON body with the image as a base64 PNG; ``seed`` None = server randomness (cacheable answers)."""
    seeded = {} if seed is None else {"seed": seed}
    return {"image_base64": png_base64(pixels), "model": model_id, **seeded, **params}


def fresh_bodies(
    rng: np.random.Generator, shape: tuple[int, int, int], model_id: str, **params: object
) -> Callable[[], Body]:
    """A maker of bodies, each with a new random image and a client seed (so the certificate cache never answers)."""

    def make() -> Body:
        return image_body(random_pixels(rng, shape), model_id, int(rng.integers(0, 2**62)), **params)

    return make


async def post(client: httpx.AsyncClient, endpoint: str, body: Body) -> tuple[float, dict]:
    """POST ``body`` to ``endpoint``; (latency in s, answer). Raises httpx.HTTPStatusError on a non-2xx."""
    started = time.perf_counter()
    response = await client.post(endpoint, json=body)
    latency = time.perf_counter() - started
    response.raise_for_status()
    return latency, response.json()


async def closed_loop(client: httpx.AsyncClient, endpoint: str, make_body: Callable[[], Body], tally: Tally) -> None:
    """Send requests one after another until cancelled, recording each answer in ``tally``."""
    while True:
        try:
            latency, _ = await post(client, endpoint, make_body())
            tally.answers.append((time.perf_counter(), latency))
        except httpx.HTTPStatusError as e:
            tally.errors[f"HTTP {e.response.status_code}"] += 1
            await asyncio.sleep(BUSY_BACKOFF_S)
        except httpx.TransportError as e:
            tally.errors[type(e).__name__] += 1
            await asyncio.sleep(BUSY_BACKOFF_S)


def start_clients(
    client: httpx.AsyncClient, endpoint: str, make_body: Callable[[], Body], count: int, tally: Tally
) -> list[asyncio.Task]:
    return [asyncio.create_task(closed_loop(client, endpoint, make_body, tally)) for _ in range(count)]


async def stop_clients(tasks: list[asyncio.Task]) -> None:
    """Cancel the clients; their open requests are dropped, and the service cancels their work."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def read_metrics(client: httpx.AsyncClient, model_id: str) -> dict[str, float]:
    """The service's noise-sample counter for ``model_id`` (summed over its executors) and its pending-sample
    gauge, from /metrics."""
    response = await client.get("/metrics")
    response.raise_for_status()
    values = {"noise_samples": 0.0, "pending_samples": 0.0}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "certserve_noise_samples_total" and sample.labels.get("model") == model_id:
                values["noise_samples"] += sample.value  # one series per executor
            elif sample.name == "certserve_pending_samples":
                values["pending_samples"] = sample.value
    return values


async def noise_samples_now(client: httpx.AsyncClient, model_id: str) -> tuple[float, float]:
    """(time.perf_counter(), the noise-sample counter) taken together."""
    metrics = await read_metrics(client, model_id)
    return time.perf_counter(), metrics["noise_samples"]


async def wait_idle(client: httpx.AsyncClient, model_id: str, timeout_s: float = 60.0) -> float:
    """Wait until the service has no pending samples (cancelled clients' work dropped); seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if (await read_metrics(client, model_id))["pending_samples"] == 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the service still had pending samples {timeout_s:g} s after its clients stopped")


def summarize(latencies: list[float]) -> dict[str, float | int | None]:
    """Count, p50, p99, mean and max of latencies given in seconds, reported in milliseconds."""
    if not latencies:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = np.asarray(latencies) * 1000.0
    return {
        "count": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }
