"""The worker pool of one process: one executor per device, all fed by the one scheduler.

``CERTSERVE_DEVICES`` names the executors: ``auto`` (every visible CUDA GPU, else the CPU as
``AUTO_CPU_EXECUTORS`` executors), a list (``cuda:0,cuda:1``), ``cpu``, or ``cpu×2`` / ``cpu*2`` /
``cpu:2`` for two CPU executors that split the threads. Each model is loaded and tuned once per
device (CPU executors share one copy, tuned at their own thread count); the scheduler hands the
next batch to whichever executor asks first, so one request's chunks may run on several devices.
Its answer does not depend on which: each chunk's noise comes from its seeded blocks and the
counts add up (only last-bit float rounding differs between batch compositions). Each executor refines
its models' batch sizes while it serves (``service.engine.refine``; CERTSERVE_REFINE_BATCH_SIZE): a
move is exported (``certserve_batch_size_samples``) and stored in the tuning cache for the next start.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service import metrics
from service.engine.engine import Engine
from service.engine.executor import Executor
from service.engine.models import LoadedModel, load_models
from service.engine.refine import BatchRefiner, candidates_for
from service.engine.scheduler import Batch, Scheduler
from service.gpu_metrics import GPU
from smoothing.runtime import claim_threads
from smoothing.tuning import store_batch_size

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

# What `auto` runs on a CPU: measured with `python -m bench.executors` on the 2-core development machine
# (BENCHMARKS.md, "Executors on one CPU"): two one-thread executors classified 1.36x the samples of one
# two-thread executor (median of 5 interleaved rounds, quiet machine; 5.2x on a busy one, where the OpenMP
# team stalls whenever another process takes one of its cores). One executor per core it is.
AUTO_CPU_EXECUTORS = 2
_CPU_COUNT = re.compile(r"^cpu\s*(?:×|\*|x|:)\s*(\d+)$")


@dataclass(frozen=True)
class Slot:
    """One executor to start: its name (``cuda:0``; ``cpu``, or ``cpu#k`` among several), device and threads."""

    name: str
    device: torch.device
    threads: int


def cpu_cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_devices(spec: str, threads: int = 0) -> list[Slot]:
    """The executors ``spec`` (CERTSERVE_DEVICES) names; ``threads`` = CPU threads in all (0 = one per core).

    Raises ValueError for a spec that names no device or a CUDA device that is not visible.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return [Slot(f"cuda:{k}", torch.device("cuda", k), 0) for k in range(torch.cuda.device_count())]
        spec = f"cpu*{AUTO_CPU_EXECUTORS}"
    total = threads or cpu_cores()
    slots: list[Slot] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        count = _CPU_COUNT.match(part)
        if count or part == "cpu":
            executors = int(count.group(1)) if count else 1
            if executors < 1:
                raise ValueError(f"need at least one CPU executor, got {part!r}")
            per_executor = max(1, total // executors)
            names = ["cpu"] if executors == 1 else [f"cpu#{k}" for k in range(executors)]
            slots += [Slot(name, torch.device("cpu"), per_executor) for name in names]
            continue
        try:
            device = torch.device(part)
        except RuntimeError as e:
            raise ValueError(f"unknown device {part!r} in CERTSERVE_DEVICES={spec!r}") from e
        if device.type == "cuda":
            device = torch.device("cuda", device.index or 0)
            if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():
                raise ValueError(f"{device} is not visible (CUDA available: {torch.cuda.is_available()})")
        slots.append(Slot(str(device), device, 0))
    if not slots:
        raise ValueError(f"CERTSERVE_DEVICES={spec!r} names no device")
    if len({s.name for s in slots}) < len(slots):
        raise ValueError(f"CERTSERVE_DEVICES={spec!r} names a device twice")
    return slots


def load_for_slots(
    slots: list[Slot],
    model_dir: Path,
    model_ids: list[str],
    *,
    max_batch: int = 0,
    tuning_cache: Path | None = None,
    precision: str = "float32",
) -> dict[str, dict[str, LoadedModel]]:
    """The models of each slot, loaded and tuned once per device (at the slot's thread count on a CPU).

    Call it on a thread that then exits (its OpenMP team goes with it, see service.engine.executor)."""
    by_device: dict[torch.device, dict[str, LoadedModel]] = {}
    for slot in slots:
        if slot.device not in by_device:
            if slot.device.type == "cpu":
                claim_threads(slot.threads)  # the tuned plan is that of the executor's thread count
            by_device[slot.device] = load_models(
                model_dir, model_ids, slot.device, max_batch=max_batch, tuning_cache=tuning_cache, precision=precision
            )
    return {slot.name: by_device[slot.device] for slot in slots}


def _both(
    first: Callable[[Batch, float], None], second: Callable[[Batch, float], None] | None
) -> Callable[[Batch, float], None]:
    if second is None:
        return first

    def call(batch: Batch, seconds: float) -> None:
        first(batch, seconds)
        second(batch, seconds)

    return call


class Pool:
    """The executors of one scheduler. Readiness: at least one alive; ``devices()`` reports each."""

    def __init__(
        self,
        scheduler: Scheduler,
        slots: list[Slot],
        models: dict[str, dict[str, LoadedModel]],
        *,
        on_batch: Callable[[Batch, float], None] | None = None,
        refiner: Callable[[LoadedModel], BatchRefiner] | None = None,
        tuning_cache: Path | None = None,
    ) -> None:
        """``refiner``: makes each executor's refiner of each model (``default_refiner``; None = fixed batch
        sizes); a move is exported and stored in ``tuning_cache``."""
        self.scheduler = scheduler
        self.tuning_cache = tuning_cache
        self.executors = [
            Executor(
                scheduler,
                models[slot.name],
                name=slot.name,
                on_batch=_both(functools.partial(metrics.record_batch, executor=slot.name), on_batch),
                on_failure=functools.partial(metrics.record_forward_failure, executor=slot.name),
                threads=slot.threads,
                peers_alive=self._peers_alive,
                shortens=self._shortens,
                refiner=refiner,
                on_refine=functools.partial(self._refined, slot.name, models[slot.name]),
            )
            for slot in slots
        ]
        for slot in slots:
            metrics.track_executor(slot.name, models[slot.name])

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The first executor's models: what the engine and the API describe (manifests, plans)."""
        return self.executors[0].models

    @property
    def uses_cuda(self) -> bool:
        return any(e.device.type == "cuda" for e in self.executors)

    def start(self) -> None:
        """Start every executor, then limit every other thread of the process to one intra-op thread.

        ``torch.set_num_threads`` changes the calling thread's own count and the count that threads
        computing for the first time start with; the executors have set their own by then."""
        for executor in self.executors:
            executor.start()
        torch.set_num_threads(1)

    def stop(self, timeout: float = 5.0) -> None:
        for executor in self.executors:
            executor.stop(timeout)

    @property
    def alive(self) -> bool:
        """Whether any executor serves."""
        return any(e.alive for e in self.executors)

    def _refined(self, executor: str, models: dict[str, LoadedModel], model_id: str, size: int, rate: float) -> None:
        """An executor moved a model's batch size: export it, and store it for the next start (rare: on a move)."""
        metrics.record_batch_size(model_id, executor, size)
        store_batch_size(models[model_id].plan, size, rate, self.tuning_cache)

    def _peers_alive(self, executor: Executor) -> bool:
        return any(e.alive for e in self.executors if e is not executor)

    def _shortens(self, executor: Executor) -> bool:
        """Only the first executor that serves runs interactive-size batches while predictions are recent.

        A prediction waits for whichever executor frees first, so one executor on short batches bounds that
        wait; the others keep their throughput size. Measured on the 2-core CPU (cpu*2, 4 certify clients and
        sequential predictions, 4 rounds each): certification ~22,000 samples/s against ~19,600 with every
        executor shortening, the predictions' p50/p99 the same within the rounds' spread (bench/findings.md)."""
        return executor is next((e for e in self.executors if e.alive), None)

    def devices(self) -> list[dict[str, object]]:
        """Each executor: name, device, whether it serves, and why not (``error``)."""
        return [
            {"name": e.name, "device": str(e.device), "alive": e.alive, "threads": e.threads, "error": e.error}
            for e in self.executors
        ]


def default_refiner(loaded: LoadedModel, *, max_batch: int = 0) -> BatchRefiner:
    """A refiner from the model's plan, over the tuner's sizes of its device up to ``max_batch`` (0 = no cap)."""
    return BatchRefiner(loaded.plan.batch_size, candidates_for(loaded.device.type, max_batch))


def start_engine(
    settings: Settings,
    slots: list[Slot],
    models: dict[str, dict[str, LoadedModel]],
    *,
    on_batch: Callable[[Batch, float], None] | None = None,
) -> tuple[Engine, Pool]:
    """The scheduler, its started pool and the engine over them, as ``settings`` say (API and job workers alike),
    with their metrics (per executor, the scheduler's, the GPUs'). ``on_batch``: an extra hook of every executor.

    ``models``: ``load_for_slots(slots, ...)``'s answer. Stop the pool when done."""
    first = models[slots[0].name]
    refiner = functools.partial(default_refiner, max_batch=settings.max_batch) if settings.refine_batch_size else None
    scheduler = Scheduler(
        max_pending_samples=settings.max_pending_samples,
        batch_delay_s=settings.batch_delay_ms / 1000.0,
        shares=settings.shares,
        expected_rates={model_id: m.plan.samples_per_second for model_id, m in first.items()},
    )
    pool = Pool(
        scheduler,
        slots,
        models,
        on_batch=on_batch,
        refiner=refiner,
        tuning_cache=settings.tuning_cache,
    )
    pool.start()
    metrics.track_scheduler(scheduler, first)
    GPU.watch([slot.device for slot in slots])
    engine = Engine(scheduler, pool.models, timeout_s=settings.request_timeout_s, pin_inputs=pool.uses_cuda)
    return engine, pool


def load_settings_models(settings: Settings, slots: list[Slot]) -> dict[str, dict[str, LoadedModel]]:
    """``load_for_slots`` with the model folder, ids, batch cap, tuning cache and precision of ``settings``."""
    return load_for_slots(
        slots,
        settings.model_dir,
        settings.models,
        max_batch=settings.max_batch,
        tuning_cache=settings.tuning_cache,
        precision=settings.precision,
    )
