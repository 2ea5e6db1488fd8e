"""The engine's answers against the library's: the same seeds and input certified both ways on the tiny model.

The samples are the same (noise comes in seeded blocks, whatever the batches), so the selection
counts agree exactly; estimation counts may differ by a few argmax flips, from last-bit float
rounding of other batch compositions.
"""

from __future__ import annotations

import asyncio

import torch
from tiny_model import TINY_CLASSES, TINY_ID, TINY_SIGMA

from service.engine.engine import Engine
from service.engine.models import LoadedModel
from service.engine.scheduler import Priority
from smoothing.core import Certificate, certify, certify_procedure

SEEDS = range(6)
N0, N = 64, 1024
FLIPS_ALLOWED = 2  # argmax flips between batch compositions (last-bit float rounding), as in the API tests


def library_certificates(loaded: LoadedModel) -> list[Certificate]:
    """The library's certificates of mid-gray for each seed, at the plan's batch size."""
    x = torch.full((1, 28, 28), 0.5)
    return [
        certify(
            loaded.plan.model,
            x,
            sigma=TINY_SIGMA,
            num_classes=len(TINY_CLASSES),
            n0=N0,
            n=N,
            alpha=0.001,
            batch_size=loaded.batch_size,
            seed=seed,
            channels_last=loaded.plan.channels_last,
        )
        for seed in SEEDS
    ]


def certify_concurrently(engine: Engine) -> list[Certificate]:
    """The engine's certificates of mid-gray for each seed (client seeds), all submitted at once."""

    async def all_of_them() -> list:
        x = torch.full((1, 28, 28), 0.5)
        procedure = lambda: certify_procedure(n0=N0, n=N, alpha=0.001, sigma=TINY_SIGMA)  # noqa: E731
        jobs = [engine.run(TINY_ID, x, procedure(), seed=s, priority=Priority.CERTIFY) for s in SEEDS]
        return [c for c, _ in await asyncio.gather(*jobs)]

    return asyncio.run(all_of_them())


def assert_same_answers(service: list[Certificate], library: list[Certificate]) -> None:
    for got, expected in zip(service, library, strict=True):
        assert got.selection_counts == expected.selection_counts
        assert sum(got.estimation_counts) == sum(expected.estimation_counts) == N
        moved = sum(abs(a - b) for a, b in zip(got.estimation_counts, expected.estimation_counts, strict=True)) // 2
        assert moved <= FLIPS_ALLOWED, (got.estimation_counts, expected.estimation_counts)
