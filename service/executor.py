"""The executor: one thread per device that owns the loaded models and runs the forward passes.

It asks the scheduler for a batch, draws the noise on the device, runs noise + forward +
argmax + bincount (``smoothing.sampling.count_chunks``) and hands the counts back. The event
loop never runs a forward pass.

CPU threads: the executor's thread is the only one that computes on several cores. Once it runs,
every other thread of the process is limited to one intra-op thread. The reason is libgomp
(PyTorch's OpenMP): each thread that ever ran a parallel operation keeps a team of worker
threads, and when a process holds more such threads than there are CPUs, libgomp stops spinning
at the barriers between operations and puts its workers to sleep instead. One stray team (the
thread that loaded the models, a decoding thread) cost the forward passes about a quarter of
their throughput on a 2-core machine (37,000 against 50,000 samples/s, bench/findings.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.checkpoint import Manifest
from models.registry import list_models, load_model
from service.scheduler import Batch, Scheduler
from smoothing.sampling import count_chunks
from smoothing.tuning import InferencePlan, claim_threads, prepare_for_inference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    plan: InferencePlan
    device: torch.device

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def batch_size_for(self, interactive: bool) -> int:
        """The interactive batch while predictions are recent (shorter waits), else the fastest."""
        return self.plan.interactive_batch_size if interactive else self.plan.batch_size


def pick_device(name: str) -> torch.device:
    """'auto' → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_models(
    model_dir: Path,
    model_ids: list[str],
    device: torch.device,
    *,
    max_batch: int = 0,
    tuning_cache: Path | None = None,
    precision: str = "float32",
) -> dict[str, LoadedModel]:
    """Load and tune the requested models (all in ``model_dir`` when ``model_ids`` is empty)."""
    ids = model_ids or [m.id for m in list_models(model_dir)]
    loaded = {}
    for model_id in ids:
        model, manifest = load_model(model_dir, model_id, device)
        plan = prepare_for_inference(
            model, manifest.input_shape, device, cache_key=manifest.sha256, cache_file=tuning_cache, precision=precision
        )
        if max_batch:
            plan = replace(
                plan,
                batch_size=min(plan.batch_size, max_batch),
                interactive_batch_size=min(plan.interactive_batch_size, max_batch),
            )
        log.info(
            "loaded %s on %s: batch %d (interactive %d), %.0f samples/s",
            model_id,
            device,
            plan.batch_size,
            plan.interactive_batch_size,
            plan.samples_per_second,
        )
        loaded[model_id] = LoadedModel(manifest, plan, device)
    return loaded


class Executor:
    """Runs the scheduler's batches on one device in a background thread."""

    def __init__(
        self,
        scheduler: Scheduler,
        models: dict[str, LoadedModel],
        *,
        on_batch: Callable[[Batch, float], None] | None = None,
        threads: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.models = models
        self.on_batch = on_batch  # metrics hook: (batch, seconds)
        self.threads = threads or torch.get_num_threads()  # intra-op threads of the forward passes
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="executor", daemon=True)

    def start(self) -> None:
        """Start the thread; then limit every other thread of the process to one intra-op thread.

        ``torch.set_num_threads`` changes the calling thread's own count and the count that threads
        computing for the first time start with; the executor has set its own by then.
        """
        self._thread.start()
        self._running.wait()
        torch.set_num_threads(1)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _batch_size_for(self, model_id: str, interactive: bool) -> int:
        return self.models[model_id].batch_size_for(interactive)

    def _run(self) -> None:
        # Flushing denormals is a per-thread setting: set it on the thread that runs the forward passes.
        torch.set_flush_denormal(True)
        log.info("executor computes on %d threads", claim_threads(self.threads))
        self._running.set()
        while not self._stop.is_set():
            batch = self.scheduler.next_batch(self._batch_size_for, timeout=0.05)
            if batch is None:
                continue
            model = self.models[batch.model_id]
            started = time.perf_counter()
            try:
                counts = count_chunks(
                    model.plan.model, batch.chunks, model.manifest.num_classes, model.plan.channels_last
                )
            except Exception as e:  # a failing forward pass fails its requests, never the thread
                log.exception("forward pass failed for %s", batch.model_id)
                self.scheduler.fail(batch, e)
                continue
            seconds = time.perf_counter() - started
            self.scheduler.complete(batch, counts, seconds)
            if self.on_batch is not None:
                self.on_batch(batch, seconds)
