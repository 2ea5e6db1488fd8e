"""The alternative a user would otherwise run, against the service, under the same mixed load.

The alternative is the loop of Cohen et al.'s code, written here from the paper's description:
requests are served one at a time in arrival order (FIFO), and each request's noise samples go
through the model alone, in batches of 1,000 (the model as loaded, contiguous, noise from the
global generator; denormal floats are not flushed). It runs in this process, with no HTTP in the
way; the service gets the same requests over HTTP.

The mixed load: many small predicts (n = 100) and a few certifications, all arriving at random
times within a short span, so that both systems work through the same backlog. Throughput is the
load's total noise samples over the makespan (first arrival to last answer); latency is answer
time minus arrival time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import numpy as np
import torch
from torch import nn

from bench.client import image_body, post, summarize
from bench.compute_thread import on_compute_thread
from bench.inputs import pixels_to_tensor, random_pixels
from bench.limit import PAPER_BATCH, Limit
from smoothing.core import certify_from_counts, predict_from_counts


@dataclass(frozen=True)
class MixedRequest:
    kind: str  # "predict" or "certify"
    arrival_s: float  # seconds after the load starts
    pixels: np.ndarray  # uint8 (C, H, W)
    seed: int
    n0: int  # 0 for a predict
    n: int

    @property
    def samples(self) -> int:
        return self.n0 + self.n


@dataclass(frozen=True)
class Answered:
    kind: str
    samples: int
    arrival_s: float
    finish_s: float  # seconds after the load started

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


def mixed_load(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    *,
    predicts: int,
    predict_n: int,
    certify_ns: tuple[int, ...],
    n0: int,
    span_s: float,
) -> list[MixedRequest]:
    """The requests of the mixed load, in arrival order; arrivals uniform in [0, span_s]."""
    kinds = [("predict", 0, predict_n)] * predicts + [("certify", n0, n) for n in certify_ns]
    arrivals = rng.uniform(0.0, span_s, size=len(kinds))
    load = [
        MixedRequest(kind, float(t), random_pixels(rng, shape), int(rng.integers(0, 2**62)), first, n)
        for (kind, first, n), t in zip(kinds, arrivals, strict=True)
    ]
    return sorted(load, key=lambda r: r.arrival_s)


@torch.no_grad()
def paper_counts(model: nn.Module, x: torch.Tensor, num: int, *, sigma: float, num_classes: int) -> torch.Tensor:
    """Class counts of ``num`` noisy copies of x (C, H, W), PAPER_BATCH at a time, as the paper's loop does."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = num
    while remaining > 0:
        size = min(PAPER_BATCH, remaining)
        remaining -= size
        batch = x.repeat((size, 1, 1, 1))
        noise = torch.randn_like(batch) * sigma
        predictions = model(batch + noise).argmax(1)
        counts += torch.bincount(predictions.cpu(), minlength=num_classes)
    return counts


def paper_answer(limit: Limit, request: MixedRequest, alpha: float) -> object:
    """PREDICT or CERTIFY of one request with the paper's loop; the decisions are the library's."""
    manifest = limit.manifest
    x = pixels_to_tensor(request.pixels).to(limit.device)
    torch.manual_seed(request.seed)
    common = dict(sigma=manifest.sigma, num_classes=manifest.num_classes)
    if request.kind == "predict":
        counts = paper_counts(limit.raw_model, x, request.n, **common)
        return predict_from_counts(counts, alpha=alpha, sigma=manifest.sigma)
    selection = paper_counts(limit.raw_model, x, request.n0, **common)
    estimation = paper_counts(limit.raw_model, x, request.n, **common)
    return certify_from_counts(selection, estimation, alpha=alpha, sigma=manifest.sigma)


def run_paper_loop(limit: Limit, load: list[MixedRequest], alpha: float) -> list[Answered]:
    """Serve ``load`` first-in first-out, one request at a time.

    A single worker popping a FIFO queue whose requests arrive at ``arrival_s`` is this loop: take
    the next request in arrival order, wait for it if it has not arrived yet, serve it.
    """
    torch.set_flush_denormal(False)  # the paper's setting (see bench.limit's ladder); a per-thread flag
    answered = []
    try:
        started = time.perf_counter()
        for request in load:
            wait = started + request.arrival_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            paper_answer(limit, request, alpha)
            answered.append(Answered(request.kind, request.samples, request.arrival_s, time.perf_counter() - started))
    finally:
        torch.set_flush_denormal(True)  # the benchmark's setting everywhere else
    return answered


async def run_service_load(
    client: httpx.AsyncClient, model_id: str, load: list[MixedRequest], alpha: float
) -> list[Answered]:
    """Send every request of ``load`` to the service at its arrival time, all concurrently."""
    bodies = [
        image_body(r.pixels, model_id, r.seed, n=r.n, alpha=alpha, **({"n0": r.n0} if r.kind == "certify" else {}))
        for r in load
    ]

    async def send(request: MixedRequest, body: dict[str, object]) -> Answered:
        await asyncio.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
        await post(client, f"/v1/{request.kind}", body)
        return Answered(request.kind, request.samples, request.arrival_s, time.perf_counter() - started)

    started = time.perf_counter()
    return list(await asyncio.gather(*(send(r, b) for r, b in zip(load, bodies, strict=True))))


def summarize_run(answered: list[Answered]) -> dict[str, object]:
    makespan = max(a.finish_s for a in answered) - min(a.arrival_s for a in answered)
    samples = sum(a.samples for a in answered)
    return {
        "makespan_s": makespan,
        "samples": samples,
        "samples_per_s": samples / makespan,
        "predict_latency": summarize([a.latency_s for a in answered if a.kind == "predict"]),
        "certify_latency": summarize([a.latency_s for a in answered if a.kind == "certify"]),
    }


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run with the median makespan (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["makespan_s"])[(len(runs) - 1) // 2]


async def compare_with_paper_loop(
    client: httpx.AsyncClient,
    limit: Limit,
    *,
    predicts: int,
    predict_n: int,
    certify_ns: tuple[int, ...],
    n0: int,
    span_s: float,
    alpha: float,
    seed: int,
    rounds: int = 3,
) -> dict[str, object]:
    """The same mixed load through the paper's loop (in process) and the service (HTTP), ``rounds`` times each;
    the speed-ups compare each side's median round (by makespan)."""
    manifest = limit.manifest
    load = mixed_load(
        np.random.default_rng(seed),
        manifest.input_shape,
        predicts=predicts,
        predict_n=predict_n,
        certify_ns=certify_ns,
        n0=n0,
        span_s=span_s,
    )
    papers, services = [], []
    for _ in range(rounds):  # alternating, so that a slow minute of a shared machine hits both sides
        papers.append(summarize_run(on_compute_thread(run_paper_loop, limit, load, alpha)))
        services.append(summarize_run(await run_service_load(client, manifest.id, load, alpha)))
    paper, service = median_run(papers), median_run(services)
    return {
        "rounds": rounds,
        "makespans_s": {
            "paper_loop": [r["makespan_s"] for r in papers],
            "service": [r["makespan_s"] for r in services],
        },
        "load": {
            "predicts": predicts,
            "predict_n": predict_n,
            "certify_ns": list(certify_ns),
            "n0": n0,
            "arrival_span_s": span_s,
            "samples": sum(r.samples for r in load),
        },
        "paper_loop": paper,
        "service": service,
        "throughput_speedup": service["samples_per_s"] / paper["samples_per_s"],
        "predict_p50_speedup": paper["predict_latency"]["p50_ms"] / service["predict_latency"]["p50_ms"],
        "predict_p99_speedup": paper["predict_latency"]["p99_ms"] / service["predict_latency"]["p99_ms"],
    }
