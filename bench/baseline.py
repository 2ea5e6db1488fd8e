"""The alternative a user would otherwise run, against the service, under the same mixed load.

The alternative is the loop of Cohen et al.'s code, written here from the paper's description:
requests are served one at a time in arrival order (FIFO), and each request's noise samples go
through the model alone, in batches of 1,000 (the model as loaded, contiguous, noise from the
global generator; denormal floats are not flushed). It is deployed as a user would: behind the
service's own HTTP stack (FastAPI on uvicorn, bench.paper_server), one endpoint per mode.

The mixed load: many small predicts (n = 100) and a few certifications, all arriving at random
times within a short span, so that both systems work through the same backlog. Both servers get
the same JSON bodies from the same low-CPU load generator (bench.loadgen: requests encoded
before the clock starts, one keep-alive connection per request in flight), in alternating rounds.
Throughput is the load's total noise samples over the makespan (first arrival to last answer);
latency is answer time minus arrival time.

What speed-up is attainable: the service's edge per sample is its tuned plan, L over the paper's
loop's raw rate (model as loaded, batch 1,000). Both are measured in this process, one right after
the other, before the rounds and after each; the speed-up is reported beside their median ratio.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.client import image_body, summarize
from bench.compute_thread import on_compute_thread
from bench.inputs import random_pixels
from bench.limit import PAPER_BATCH, Limit, limit_rate, paper_loop_rate
from bench.loadgen import Result, Scheduled, encode_json_post, run_schedule
from models.checkpoint import Manifest
from smoothing.core import Certificate, Prediction, certify_from_counts, predict_from_counts


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


def paper_answer(
    model: nn.Module,
    manifest: Manifest,
    x: torch.Tensor,
    *,
    kind: str,
    n0: int,
    n: int,
    seed: int,
    alpha: float,
) -> Prediction | Certificate:
    """PREDICT (``kind`` "predict", n samples) or CERTIFY (n0 + n) of x (C, H, W, on the model's device) with the
    paper's loop, noise from the global generator seeded with ``seed``; the decisions are the library's.

    Run it where denormal floats are kept (``torch.set_flush_denormal(False)``, the paper's setting; a
    per-thread CPU flag): bench.paper_server's compute thread.
    """
    torch.manual_seed(seed)
    common = dict(sigma=manifest.sigma, num_classes=manifest.num_classes)
    if kind == "predict":
        counts = paper_counts(model, x, n, **common)
        return predict_from_counts(counts, alpha=alpha, sigma=manifest.sigma, seed=seed)
    selection = paper_counts(model, x, n0, **common)
    estimation = paper_counts(model, x, n, **common)
    return certify_from_counts(selection, estimation, alpha=alpha, sigma=manifest.sigma, seed=seed)


def load_schedule(load: list[MixedRequest], url: str, prefix: str, model_id: str, alpha: float) -> list[Scheduled]:
    """The load as pre-encoded requests to ``{prefix}/predict`` and ``{prefix}/certify`` of ``url``."""
    schedule = []
    for r in load:
        sizes = {"n": r.n, **({"n0": r.n0} if r.kind == "certify" else {})}
        body = image_body(r.pixels, model_id, r.seed, alpha=alpha, **sizes)
        schedule.append(Scheduled(r.arrival_s, encode_json_post(url, f"{prefix}/{r.kind}", body)))
    return schedule


def summarize_run(load: list[MixedRequest], results: list[Result]) -> dict[str, object]:
    """Makespan, throughput and latencies of one round; ``errors`` counts answers other than 200 by status."""
    makespan = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    samples = sum(load[r.index].samples for r in results if r.status == 200)
    return {
        "makespan_s": makespan,
        "samples": samples,
        "samples_per_s": samples / makespan,
        "errors": {f"HTTP {k}": v for k, v in Counter(r.status for r in results if r.status != 200).items()},
        "predict_latency": summarize([r.latency_s for r in results if load[r.index].kind == "predict"]),
        "certify_latency": summarize([r.latency_s for r in results if load[r.index].kind == "certify"]),
    }


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run with the median makespan (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["makespan_s"])[(len(runs) - 1) // 2]


def rates_now(limit: Limit, seconds: float) -> tuple[float, float]:
    """(L, the paper's loop's raw rate) in samples/s, each over ``seconds``, on the compute thread."""
    paper = on_compute_thread(paper_loop_rate, limit.raw_model, limit.manifest.input_shape, limit.device, seconds)
    return limit_rate(limit, seconds), paper


async def compare_with_paper_loop(
    service_url: str,
    paper_url: str,
    limit: Limit,
    *,
    predicts: int,
    predict_n: int,
    certify_ns: tuple[int, ...],
    n0: int,
    span_s: float,
    alpha: float,
    seed: int,
    rounds: int,
    limit_seconds: float,
) -> dict[str, object]:
    """The same mixed load through the paper's FIFO server and the service, ``rounds`` times each, alternating;
    the speed-ups compare each side's median round (by makespan). L and the paper loop's raw rate are measured
    one after the other before the rounds and after each; the median of their ratios is the attainable speed-up."""
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
    paper_schedule = load_schedule(load, paper_url, "", manifest.id, alpha)
    service_schedule = load_schedule(load, service_url, "/v1", manifest.id, alpha)
    rates = [rates_now(limit, limit_seconds)]
    papers, services = [], []
    for _ in range(rounds):  # alternating, so that a slow minute of a shared machine hits both sides
        papers.append(summarize_run(load, await run_schedule(paper_url, paper_schedule)))
        services.append(summarize_run(load, await run_schedule(service_url, service_schedule)))
        rates.append(rates_now(limit, limit_seconds))
    paper, service = median_run(papers), median_run(services)
    # Each pair of windows is seconds apart, so its ratio is little moved by the machine's drift; the median
    # ignores a pair that another process's burst hit in one window only.
    attainable = float(np.median([lim / loop for lim, loop in rates]))
    speedup = service["samples_per_s"] / paper["samples_per_s"]
    return {
        "rounds": rounds,
        "makespans_s": {
            "paper_server": [r["makespan_s"] for r in papers],
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
        "paper_server": paper,
        "service": service,
        "limit_samples_per_s": [lim for lim, _ in rates],  # before the rounds, then after each
        "paper_loop_samples_per_s": [loop for _, loop in rates],
        "attainable_speedup": attainable,
        "throughput_speedup": speedup,
        "fraction_of_attainable": speedup / attainable,
        "predict_p50_speedup": paper["predict_latency"]["p50_ms"] / service["predict_latency"]["p50_ms"],
        "predict_p99_speedup": paper["predict_latency"]["p99_ms"] / service["predict_latency"]["p99_ms"],
    }
