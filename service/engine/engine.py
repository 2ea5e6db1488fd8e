"""The async face of the scheduler: one driver for every procedure.

Every request is a procedure (``smoothing.procedures.Question.procedure``): a generator that
yields sample requests and receives their counts. ``Engine.run`` drives it, turning each sample
request into a ``WorkItem`` for the scheduler, so PREDICT, CERTIFY and the sequential tests share
one path, and a procedure that stops early frees its share of the device at once. Awaiting
coroutines can be cancelled (client gone): the cancellation reaches the scheduler, which drops
the remaining work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TypeVar

import torch

from service.engine.models import LoadedModel
from service.engine.scheduler import Priority, Scheduler, WorkItem
from smoothing.sampling import Procedure, SampleRequest, stream_key

R = TypeVar("R")


class UnknownModel(KeyError):
    """No loaded model has this id."""


@dataclass
class Timing:
    """Seconds spent waiting for the device and counting, summed over a request's phases."""

    queued_s: float = 0.0
    compute_s: float = 0.0


class Engine:
    def __init__(
        self, scheduler: Scheduler, models: dict[str, LoadedModel], *, timeout_s: float, pin_inputs: bool = False
    ) -> None:
        self.scheduler = scheduler
        self.models = models  # manifests and plans, for answers; each executor holds its device's own copy
        self.timeout_s = timeout_s
        self.pin_inputs = pin_inputs  # page-locked inputs, so that executors copy them to a GPU without a sync

    def model(self, model_id: str) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    async def run(
        self, model_id: str, x: torch.Tensor, procedure: Procedure[R], *, seed: int, priority: Priority
    ) -> tuple[R, Timing]:
        """Drive ``procedure`` on input x (C, H, W in [0, 1]) with the noise streams of ``seed``.

        The same seed gives the same samples as ``smoothing.sampling.run`` with ``model_sampler``
        (the library), whatever else shares the batches. One deadline covers every phase.
        """
        loaded = self.model(model_id)
        x = x.to("cpu")  # the scheduler's items live on the host: any executor's device may run them
        key = stream_key(seed, x)
        if self.pin_inputs:
            x = x.pin_memory()
        deadline = time.monotonic() + self.timeout_s
        timing = Timing()
        try:
            request = next(procedure)
            while True:
                counts = await self._count(loaded, x, key, request, priority, deadline, timing)
                request = procedure.send(counts)
        except StopIteration as finished:
            return finished.value, timing

    async def _count(
        self,
        loaded: LoadedModel,
        x: torch.Tensor,
        key: int,
        request: SampleRequest,
        priority: Priority,
        deadline: float,
        timing: Timing,
    ) -> torch.Tensor:
        """Class counts (num_classes,) of the samples ``request`` names."""
        item = WorkItem(
            model_id=loaded.manifest.id,
            x=x,
            sigma=loaded.manifest.sigma,
            key=key,
            stage=request.stage,
            num=request.stop - request.start,
            num_classes=loaded.manifest.num_classes,
            priority=priority,
            start=request.start,
            deadline=deadline,
        )
        future = self.scheduler.submit(item)
        counts = await asyncio.wrap_future(future)
        finished = time.monotonic()
        started = item.first_dispatch or finished
        timing.queued_s += started - item.arrival
        timing.compute_s += finished - started
        return counts
