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

import torch

from service.engine.models import LoadedModel
from service.engine.scheduler import Batch, Scheduler
from smoothing.sampling import count_chunks
from smoothing.tuning import claim_threads

log = logging.getLogger(__name__)


class Executor:
    """Runs the scheduler's batches on one device in a background thread."""

    def __init__(
        self,
        scheduler: Scheduler,
        models: dict[str, LoadedModel],
        *,
        on_batch: Callable[[Batch, float], None] | None = None,
        on_failure: Callable[[Batch, BaseException], None] | None = None,
        threads: int = 0,
        name: str = "cpu",
    ) -> None:
        """``name`` labels this executor's metrics (the device it computes on, e.g. "cpu" or "cuda:0")."""
        self.scheduler = scheduler
        self.models = models
        self.name = name
        self.on_batch = on_batch  # metrics hook: (batch, seconds)
        self.on_failure = on_failure  # metrics hook: (batch, error) of a forward pass that raised
        self.threads = threads or torch.get_num_threads()  # intra-op threads of the forward passes
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"executor-{name}", daemon=True)

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
                if self.on_failure is not None:
                    self.on_failure(batch, e)
                continue
            seconds = time.perf_counter() - started
            self.scheduler.complete(batch, counts, seconds)
            if self.on_batch is not None:
                self.on_batch(batch, seconds)
