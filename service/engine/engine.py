"""The async face of the scheduler: PREDICT and CERTIFY as coroutines over counted samples.

A request is one or more ``WorkItem``s in sequence (CERTIFY: selection, then estimation); the
decisions come from ``smoothing.core``. Awaiting coroutines can be cancelled (client gone):
the cancellation reaches the scheduler, which drops the remaining work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import torch

from service.engine.models import LoadedModel
from service.engine.scheduler import Priority, Scheduler, WorkItem
from smoothing.core import Certificate, Prediction, certify_from_counts, predict_from_counts
from smoothing.sampling import ESTIMATION_STAGE, SELECTION_STAGE, new_seed
from smoothing.sequential import SampleRequest

R = TypeVar("R")


class UnknownModel(KeyError):
    """No loaded model has this id."""


@dataclass
class Timing:
    """Seconds spent waiting for the device and counting, summed over a request's phases."""

    queued_s: float = 0.0
    compute_s: float = 0.0


class Engine:
    def __init__(self, scheduler: Scheduler, models: dict[str, LoadedModel], *, timeout_s: float) -> None:
        self.scheduler = scheduler
        self.models = models
        self.timeout_s = timeout_s

    def model(self, model_id: str) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    async def count(
        self,
        model_id: str,
        x: torch.Tensor,
        num: int,
        *,
        stage: int,
        seed: int,
        priority: Priority,
        deadline: float,
        timing: Timing,
        start: int = 0,
    ) -> torch.Tensor:
        """Class counts (num_classes,) of samples [start, start + num) of stream (seed, stage) around x."""
        loaded = self.model(model_id)
        item = WorkItem(
            model_id=model_id,
            x=x.to(loaded.device),
            sigma=loaded.manifest.sigma,
            seed=seed,
            stage=stage,
            num=num,
            num_classes=loaded.manifest.num_classes,
            priority=priority,
            start=start,
            deadline=deadline,
        )
        future = self.scheduler.submit(item)
        counts = await asyncio.wrap_future(future)
        finished = time.monotonic()
        started = item.first_dispatch or finished
        timing.queued_s += started - item.arrival
        timing.compute_s += finished - started
        return counts

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    async def predict(
        self,
        model_id: str,
        x: torch.Tensor,
        *,
        n: int,
        alpha: float,
        seed: int | None = None,
        priority: Priority = Priority.PREDICT,
    ) -> tuple[Prediction, Timing]:
        """PREDICT with the model's own σ; same seed → same samples as ``smoothing.core.predict``."""
        seed = new_seed() if seed is None else seed
        timing = Timing()
        counts = await self.count(
            model_id,
            x,
            n,
            stage=ESTIMATION_STAGE,
            seed=seed,
            priority=priority,
            deadline=self._deadline(),
            timing=timing,
        )
        sigma = self.model(model_id).manifest.sigma
        return predict_from_counts(counts, alpha=alpha, sigma=sigma, seed=seed), timing

    async def certify(
        self,
        model_id: str,
        x: torch.Tensor,
        *,
        n0: int,
        n: int,
        alpha: float,
        seed: int | None = None,
        priority: Priority = Priority.CERTIFY,
    ) -> tuple[Certificate, Timing]:
        """CERTIFY with the model's own σ: n0 selection samples, then n independent estimation samples."""
        seed = new_seed() if seed is None else seed
        timing = Timing()
        deadline = self._deadline()
        common = dict(seed=seed, priority=priority, deadline=deadline, timing=timing)
        selection = await self.count(model_id, x, n0, stage=SELECTION_STAGE, **common)
        estimation = await self.count(model_id, x, n, stage=ESTIMATION_STAGE, **common)
        sigma = self.model(model_id).manifest.sigma
        return certify_from_counts(selection, estimation, alpha=alpha, sigma=sigma, seed=seed), timing

    async def run_sequential(
        self,
        model_id: str,
        x: torch.Tensor,
        procedure: Generator[SampleRequest, torch.Tensor, R],
        *,
        seed: int,
        priority: Priority = Priority.CERTIFY,
    ) -> tuple[R, Timing]:
        """Drive a ``smoothing.sequential`` procedure with the scheduler: each look is one work item,
        so a request that stops early frees its share of the device at once."""
        timing = Timing()
        deadline = self._deadline()
        try:
            request = next(procedure)
            while True:
                counts = await self.count(
                    model_id,
                    x,
                    request.stop - request.start,
                    stage=request.stage,
                    start=request.start,
                    seed=seed,
                    priority=priority,
                    deadline=deadline,
                    timing=timing,
                )
                request = procedure.send(counts)
        except StopIteration as finished:
            return finished.value, timing
