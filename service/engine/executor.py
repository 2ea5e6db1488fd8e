"""An executor: one thread that owns one device's loaded models and runs the scheduler's batches on it.

It asks the scheduler for a batch, copies the inputs to its device, runs noise + forward +
argmax + count (``smoothing.sampling.count_chunks``) and hands the counts back. The event
loop never runs a forward pass. Several executors (service.engine.pool) may feed from one
scheduler; each batch goes to exactly one of them.

Batch size: the executor asks for each model's throughput batch size, refined while it serves from
its own timings of full batches (``service.engine.refine``, one refiner per model; off: the plan's),
or the plan's interactive size, at most the throughput one, while predictions are recent and the
pool asks this executor to shorten (``shortens``: one executor of a pool does). A try at
a neighbouring size that raises (say, out of device memory) goes back to the queue, and that size
is not tried again.

A failing device: a forward pass that raises hands its batch back to the scheduler (``requeue``)
while another executor of the pool is alive, so that the requests are answered elsewhere; with
no other executor it fails the batch's requests. After ``MAX_CONSECUTIVE_FAILURES`` failures in
a row, an executor with live peers takes itself out of the pool (its thread ends, ``error`` says
why). A thread that dies of anything else hands its in-flight batch back the same way.

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
from dataclasses import replace

import torch

from service.engine.models import LoadedModel
from service.engine.refine import BatchRefiner
from service.engine.scheduler import Batch, Scheduler
from smoothing.runtime import claim_threads
from smoothing.sampling import count_chunks

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # forward passes in a row that raise before a device is taken out of the pool
FAILURE_BACKOFF_S = 0.05  # a failing executor waits this long (× failures in a row) so that its peers take the work


class Executor:
    """Runs the scheduler's batches on one device in a background thread named ``name``, which also labels
    its metrics (``cuda:0``, ``cpu#1``)."""

    def __init__(
        self,
        scheduler: Scheduler,
        models: dict[str, LoadedModel],
        *,
        name: str = "executor",
        on_batch: Callable[[Batch, float], None] | None = None,
        on_failure: Callable[[Batch, BaseException], None] | None = None,
        threads: int = 0,
        peers_alive: Callable[[Executor], bool] = lambda _: False,
        shortens: Callable[[Executor], bool] = lambda _: True,
        refiner: Callable[[LoadedModel], BatchRefiner] | None = None,
        on_refine: Callable[[str, int, float], None] | None = None,
    ) -> None:
        """``refiner``: makes each model's BatchRefiner (None = the plans' batch sizes, fixed; a pinned plan's
        always is). ``on_refine``: called on the executor's thread with (model id, new batch size, samples/s)
        when refinement moves one. ``shortens``: whether this executor takes the interactive batch size while
        predictions are recent (the pool asks one executor of several to, see service.engine.pool)."""
        self.scheduler = scheduler
        self.models = models
        self.name = name
        self.device = next(iter(models.values())).device if models else torch.device("cpu")
        self.on_batch = on_batch  # metrics hook: (batch, seconds)
        self.on_failure = on_failure  # metrics hook: (batch, error) of a forward pass that raised
        self.threads = threads or torch.get_num_threads()  # intra-op threads of the forward passes
        self.peers_alive = peers_alive  # whether another executor of the pool can take over its work
        self.shortens = shortens
        # A plan pinned to one batch size (smoothing.tuning) is not refined, as it is not re-validated at start.
        refined = {} if refiner is None else {m: loaded for m, loaded in models.items() if not loaded.plan.pinned}
        self.refiners = {model_id: refiner(loaded) for model_id, loaded in refined.items()}
        self.on_refine = on_refine
        self._asked: tuple[str, int, bool] | None = None  # (model, size, interactive) of the last size handed out
        self.consecutive_failures = 0
        self.error: str | None = None  # why the executor left the pool; None while it serves
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread and wait until it has claimed its intra-op threads."""
        self._thread.start()
        self._running.wait()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def batch_size(self, model_id: str) -> int:
        """The model's throughput batch size on this executor now: the refined one, or the plan's."""
        refiner = self.refiners.get(model_id)
        return refiner.batch_size if refiner is not None else self.models[model_id].batch_size

    def _batch_size_for(self, model_id: str, interactive: bool) -> int:
        interactive = interactive and self.shortens(self)
        refiner = self.refiners.get(model_id)
        if refiner is None:
            size = self.models[model_id].batch_size_for(interactive)
        elif interactive:  # the interactive logic is the plan's; refinement only keeps it ≤ the throughput size
            size = min(self.models[model_id].plan.interactive_batch_size, refiner.batch_size)
        else:
            size = refiner.propose()
        self._asked = (model_id, size, interactive)
        return size

    def _run(self) -> None:
        # Flushing denormals is a per-thread setting: set it on the thread that runs the forward passes.
        torch.set_flush_denormal(True)
        log.info("%s computes on %s with %d threads", self.name, self.device, claim_threads(self.threads))
        self._running.set()
        batch: Batch | None = None
        try:
            while not self._stop.is_set():
                batch = self.scheduler.next_batch(self._batch_size_for, timeout=0.05)
                if batch is None:
                    continue
                if not self._run_batch(batch, self._asked):
                    return
                batch = None
        except BaseException as e:  # the thread dies: its batch goes back to the queue, or fails
            self.error = f"executor thread died: {type(e).__name__}: {e}"
            log.exception("%s died", self.name)
            if batch is not None:
                self._give_back(batch, e)

    def _run_batch(self, batch: Batch, asked: tuple[str, int, bool] | None = None) -> bool:
        """Run one batch (``asked``: the size it was asked at, see ``_batch_size_for``); False once this executor
        has taken itself out of the pool."""
        model = self.models[batch.model_id]
        refiner = self.refiners.get(batch.model_id) if asked is not None and asked[0] == batch.model_id else None
        started = time.perf_counter()
        try:
            # Inputs live on the host (pinned when a GPU is in use): copy each once, without waiting.
            inputs: dict[int, torch.Tensor] = {}
            for c in batch.chunks:
                if id(c.x) not in inputs:
                    inputs[id(c.x)] = c.x.to(model.device, non_blocking=True)
            chunks = [replace(c, x=inputs[id(c.x)]) for c in batch.chunks]
            counts = count_chunks(model.plan.model, chunks, model.manifest.num_classes, model.plan.channels_last)
        except Exception as e:  # a failing forward pass never kills the thread by itself
            if refiner is not None and not asked[2] and asked[1] != refiner.batch_size:
                # A try at a neighbouring size: the size is at fault until shown otherwise, not the device.
                log.warning("%s: %s at batch %d failed (%s); not tried again", self.name, batch.model_id, asked[1], e)
                refiner.failed(asked[1])
                self.scheduler.requeue(batch, e)
                if self.on_failure is not None:
                    self.on_failure(batch, e)
                return True
            self.consecutive_failures += 1
            log.exception("%s: forward pass failed (%d in a row)", self.name, self.consecutive_failures)
            self._give_back(batch, e)
            if self.on_failure is not None:
                self.on_failure(batch, e)
            if self.peers_alive(self):
                if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                    last = f"{type(e).__name__}: {e}"
                    self.error = f"{self.consecutive_failures} forward passes in a row failed, last: {last}"
                    log.error("%s taken out of the pool: %s", self.name, self.error)
                    return False
                self._stop.wait(FAILURE_BACKOFF_S * self.consecutive_failures)
            return True
        self.consecutive_failures = 0
        seconds = time.perf_counter() - started
        self.scheduler.complete(batch, counts, seconds)
        if refiner is not None:
            self._refine(refiner, batch, asked, seconds)
        if self.on_batch is not None:
            try:
                self.on_batch(batch, seconds)
            except Exception:  # a metrics hook that breaks loses a sample, never the device (the batch is done)
                log.exception("%s: on_batch hook failed", self.name)
        return True

    def _refine(self, refiner: BatchRefiner, batch: Batch, asked: tuple[str, int, bool], seconds: float) -> None:
        """Feed the batch's timing to the model's refiner; on a move, log it and tell ``on_refine``."""
        model_id, size, interactive = asked
        if interactive:
            refiner.interrupt()
            return
        before = refiner.batch_size
        moved = refiner.observe(size, batch.size, seconds)
        if moved is None:
            return
        rate = refiner.samples_per_second or 0.0
        log.info("%s: %s's batch size %d → %d (about %.0f samples/s)", self.name, model_id, before, moved, rate)
        if self.on_refine is not None:
            try:
                self.on_refine(model_id, moved, rate)
            except Exception:  # persisting or exporting the size may fail; serving at it does not
                log.exception("%s: on_refine hook failed", self.name)

    def _give_back(self, batch: Batch, error: BaseException) -> None:
        """Another executor runs the batch's chunks if one is alive; otherwise its requests fail."""
        if self.peers_alive(self):
            self.scheduler.requeue(batch, error)
        else:
            self.scheduler.fail(batch, error)
