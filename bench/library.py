"""The library: ``smoothing.core.certify`` throughput as a fraction of L.

Rounds of back-to-back certifications alternate with L windows; each round is compared with the
mean of the L windows before and after it, so a shared machine's drift cancels out, and the
headline is the median round's fraction.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.limit import Limit, limit_rate
from smoothing.core import certify


def certify_for(
    limit: Limit, images: torch.Tensor, seconds: float, *, n0: int, n: int, alpha: float, first_seed: int
) -> tuple[int, float, list[dict[str, object]]]:
    """Certify ``images`` in turn (wrapping around) for at least ``seconds``; return (samples, seconds, answers)."""
    manifest = limit.manifest
    answers = []
    started = time.perf_counter()
    while not answers or time.perf_counter() - started < seconds:
        x = images[len(answers) % len(images)]
        certificate = certify(
            limit.model,
            x,
            sigma=manifest.sigma,
            num_classes=manifest.num_classes,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=limit.batch_size,
            seed=first_seed + len(answers),
            channels_last=limit.channels_last,
        )
        answers.append({"label": certificate.label, "radius": certificate.radius})
    return len(answers) * (n0 + n), time.perf_counter() - started, answers


def measure_library(
    limit: Limit,
    images: torch.Tensor,
    *,
    n0: int,
    n: int,
    alpha: float,
    rounds: int,
    seconds: float,
    limit_seconds: float,
) -> dict[str, object]:
    """CERTIFY samples/s of the library (same model, batch size and memory format as L) over L.

    Call it through ``on_compute_thread`` (see bench.compute_thread).
    """
    limits = [limit_rate(limit, limit_seconds)]
    rows = []
    answers: list[dict[str, object]] = []
    for r in range(rounds):
        samples, elapsed, round_answers = certify_for(
            limit, images, seconds, n0=n0, n=n, alpha=alpha, first_seed=10_000 * (r + 1)
        )
        limits.append(limit_rate(limit, limit_seconds))
        rate = samples / elapsed
        rows.append(
            {
                "certifications": len(round_answers),
                "samples_per_s": rate,
                "limit_samples_per_s": (limits[-2] + limits[-1]) / 2,
                "fraction_of_limit": rate / ((limits[-2] + limits[-1]) / 2),
            }
        )
        answers.extend(round_answers)
    rate = (
        sum(r["certifications"] for r in rows)
        * (n0 + n)
        / sum(r["certifications"] * (n0 + n) / r["samples_per_s"] for r in rows)
    )
    mean_limit = sum(limits) / len(limits)
    return {
        "n0": n0,
        "n": n,
        "batch_size": limit.batch_size,
        "samples_per_s": rate,
        "limit_samples_per_s": mean_limit,
        # The median round: one round that shares the CPU with something else (a shared machine) does not move it.
        "fraction_of_limit": statistics.median(r["fraction_of_limit"] for r in rows),
        "pooled_fraction_of_limit": rate / mean_limit,
        "rounds": rows,
        "certifications": len(answers),
        "abstentions": sum(a["label"] is None for a in answers),
        "mean_radius": sum(float(a["radius"]) for a in answers) / len(answers),
    }
