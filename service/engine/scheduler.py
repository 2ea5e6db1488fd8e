"""Cross-request micro-batching of noise samples (pure Python + torch; no HTTP).

Work is measured in samples, not requests. A ``WorkItem`` asks for the class counts of samples
[0, num) of one input's noise stream. At every step the executor asks ``next_batch`` for up to
the model's best batch size: the scheduler picks the class that leads the batch, takes the model
of that class's oldest item, then fills the batch from that model's items, the lead class first,
round-robin inside a class, one chunk per item per turn. A 100,000-sample certification
therefore never blocks a 100-sample prediction that arrives after it.

Classes share the device by weight while they have work (weighted fair queueing in samples): each
class's samples served are counted divided by its share (its weighted service). The most urgent
class with work leads the next batch unless it is more than ``FAIR_BURST`` weighted samples ahead
of the least-served class with work, which then leads. So a prediction is served in the next
batch as under strict priority, while a flood of predictions still leaves certifications and jobs
at least their share of the samples (DEFAULT_SHARES, settable). A class that was idle comes back
level with the busy ones, without saved-up credit; a debt it ran up stays. A batch led by PREDICT
work holds PREDICT work only: a prediction waits for at most the batch in flight, then runs in a
batch of its own size instead of a full one. And for ``INTERACTIVE_WINDOW_S`` after PREDICT work arrives, the executors
are told so (``batch_size_for``'s second argument): one of them then takes the model's interactive size
(the smallest near its best throughput, smoothing.tuning) rather than its fastest, so that some batch
in flight is always short (service.engine.pool, bench/findings.md).

Threads: the event loop calls ``submit`` and cancels futures; each executor thread of the pool
(service.engine.pool) calls ``next_batch`` and ``complete``, or ``requeue`` when its device failed
so that another executor runs those chunks. One condition variable guards all state, so any
number of executors can consume: a batch is handed out once, whole, to the executor that asked.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch

from smoothing.sampling import NOISE_BLOCK, Chunk

INTERACTIVE_WINDOW_S = 1.0
# An item whose chunks came back from failed devices more often than this fails. It is above the failures
# that take one device out of the pool (service.engine.executor), so a single bad device fails no request.
MAX_REQUEUES = 8
# Samples per second assumed for a model before its first batch when no measured rate was given.
ASSUMED_SAMPLES_PER_S = 1_000.0


class Priority(IntEnum):
    """Classes of work; lower value = more urgent (wins ties, and predictions lead short batches)."""

    PREDICT = 0
    CERTIFY = 1
    JOB = 2


DEFAULT_SHARES: dict[Priority, float] = {Priority.PREDICT: 0.6, Priority.CERTIFY: 0.3, Priority.JOB: 0.1}
"""Fraction of the device's samples each class is guaranteed while every class has work (normalised to sum 1)."""
FAIR_BURST = 10_000.0
"""Weighted samples (samples ÷ share) a more urgent class may run ahead of the least-served one before yielding:
6,000 samples of predictions at the default share, a bound on how far the shares may be off at any moment."""


class QueueFull(Exception):
    """More samples of one class are pending than the per-class bound; retry after ``retry_after_s``."""

    def __init__(self, pending: int, limit: int, retry_after_s: int, priority: Priority) -> None:
        super().__init__(
            f"{pending} noise samples of {priority.name.lower()} work already pending (limit {limit} per class); "
            f"retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before its samples were all counted; its remaining work was dropped."""


@dataclass(eq=False)
class WorkItem:
    """Count the base classifier's predictions on samples [start, start + num) of stream (key, stage) around x."""

    model_id: str
    x: torch.Tensor  # (C, H, W) in [0, 1], on the host (each executor copies it to its device)
    sigma: float
    key: int  # the request's noise stream key (smoothing.sampling.stream_key)
    stage: int
    num: int
    num_classes: int
    priority: Priority
    start: int = 0  # first sample index of the stream (sequential procedures continue a stream)
    deadline: float | None = None  # time.monotonic() seconds
    arrival: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)  # resolves to the counts, int64 (num_classes,)
    counts: torch.Tensor = field(init=False)
    dispatched: int = 0  # samples of the stream's prefix handed to executors so far
    counted: int = 0  # samples whose predictions came back
    returned: deque[tuple[int, int]] = field(default_factory=deque)  # stream ranges back from failed devices
    returned_samples: int = 0  # samples in ``returned``
    requeues: int = 0  # batches of this item that came back from a failed device
    first_dispatch: float | None = None
    dropped: bool = False  # cancelled, expired or failed: its pending samples were already released

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_classes, dtype=torch.long)

    @property
    def undispatched(self) -> int:
        return self.num - self.dispatched + self.returned_samples

    def take(self, size: int) -> tuple[int, int]:
        """The next stream range [first, stop) of at most ``size`` samples to run: returned ranges first."""
        if self.returned:
            first, stop = self.returned[0]
            size = min(size, stop - first)
            if first + size == stop:
                self.returned.popleft()
            else:
                self.returned[0] = (first + size, stop)
            self.returned_samples -= size
            return first, first + size
        size = min(size, self.num - self.dispatched)
        first = self.start + self.dispatched
        self.dispatched += size
        return first, first + size


@dataclass(frozen=True)
class Batch:
    """One forward pass: ``chunks[i]`` belongs to ``items[i]`` (an item may appear several times)."""

    model_id: str
    items: list[WorkItem]
    chunks: list[Chunk]

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        *,
        max_pending_samples: int,
        chunk_size: int = NOISE_BLOCK,
        batch_delay_s: float = 0.0,
        shares: Mapping[Priority, float] = DEFAULT_SHARES,
        expected_rates: Mapping[str, float] | None = None,
    ) -> None:
        """``expected_rates``: samples per second of forward pass to assume per model until its batches
        have been timed (the tuner's measurement), for Retry-After and the backlog."""
        if chunk_size % NOISE_BLOCK:
            raise ValueError(f"chunk_size must be a multiple of the noise block ({NOISE_BLOCK}), got {chunk_size}")
        if max_pending_samples <= 0 or batch_delay_s < 0:
            raise ValueError("max_pending_samples must be > 0 and batch_delay_s >= 0")
        if set(shares) != set(Priority) or not all(share > 0 for share in shares.values()):
            raise ValueError(f"shares need a positive share for each of {[p.name for p in Priority]}, got {shares}")
        total = sum(shares.values())
        self.shares = {p: shares[p] / total for p in Priority}
        # Samples served to each class divided by its share (a virtual time): the lowest with work leads.
        self._weighted_service = {p: 0.0 for p in Priority}
        self.max_pending_samples = max_pending_samples
        self.chunk_size = chunk_size
        self.batch_delay_s = batch_delay_s
        self._queues: dict[Priority, deque[WorkItem]] = {p: deque() for p in Priority}
        # Samples submitted and not yet counted (or dropped), per class: each class has its own bound, so that
        # a flood of batch work cannot make interactive requests wait or be refused.
        self._pending = {p: 0 for p in Priority}
        self._cond = threading.Condition()
        # Per model: samples per second of forward pass, a moving average over its batches (``complete``).
        self._rates: dict[str, float] = dict(expected_rates or {})
        self._interactive_until = 0.0  # time.monotonic() until which batches use the interactive size

    @property
    def pending_samples(self) -> int:
        return sum(self._pending.values())

    def backlog_seconds(self) -> dict[str, float]:
        """Per model with pending samples: seconds of forward passes they need at the model's recent rate.

        The sum over models is how long the device needs to clear the queue if nothing more
        arrives; it is also what Retry-After says when the queue is full.
        """
        with self._cond:
            return self._backlog_seconds()

    def submit(self, item: WorkItem) -> Future:
        """Queue ``item``; its future resolves to its counts. Raises QueueFull beyond the bound."""
        with self._cond:
            pending = self._pending[item.priority]
            if pending + item.num > self.max_pending_samples:
                retry = max(1, round(sum(self._backlog_seconds().values())))
                raise QueueFull(pending, self.max_pending_samples, retry, item.priority)
            self._pending[item.priority] += item.num
            if not self._has_work(item.priority):  # back from idle: level with the others, no saved-up credit
                self._weighted_service[item.priority] = max(self._weighted_service[item.priority], self._level())
            self._queues[item.priority].append(item)
            if item.priority == Priority.PREDICT:
                self._interactive_until = time.monotonic() + INTERACTIVE_WINDOW_S
            self._cond.notify_all()
        return item.future

    def next_batch(self, batch_size_for: Callable[[str, bool], int], timeout: float) -> Batch | None:
        """The next batch to run, or None if there was none ready within ``timeout`` seconds.

        ``batch_size_for(model_id, interactive)`` gives the model's batch size, its interactive one
        while PREDICT work is recent."""
        with self._cond:
            self._drop_finished_and_expired()
            lead = self._most_urgent()
            if lead is None:
                self._cond.wait(timeout)
                return None
            batch_size = batch_size_for(lead.model_id, time.monotonic() < self._interactive_until)
            if self.batch_delay_s > 0:
                ready = sum(i.undispatched for q in self._queues.values() for i in q if i.model_id == lead.model_id)
                wait = min(i.arrival for q in self._queues.values() for i in q) + self.batch_delay_s - time.monotonic()
                if ready < batch_size and wait > 0:
                    self._cond.wait(min(wait, timeout))
                    return None
            if lead.priority == Priority.PREDICT:
                classes = [Priority.PREDICT]
            else:  # the lead class first; leftover room goes to the others, most urgent first
                classes = [lead.priority, *(p for p in Priority if p != lead.priority)]
            batch = self._fill(lead.model_id, batch_size, classes)
            for item, chunk in zip(batch.items, batch.chunks, strict=True):
                self._weighted_service[item.priority] += chunk.size / self.shares[item.priority]
            if self._most_urgent() is not None:
                self._cond.notify()  # more work left: wake another idle executor rather than wait for its timeout
            return batch

    def complete(self, batch: Batch, counts: torch.Tensor, service_seconds: float) -> None:
        """Add each chunk's counts (len(chunks), num_classes) to its item; resolve finished items."""
        with self._cond:
            for item, chunk, row in zip(batch.items, batch.chunks, counts, strict=True):
                item.counts += row
                item.counted += chunk.size
                # A dropped item released all its samples, in-flight ones included. A cancelled one not yet
                # dropped still holds them (testing future.done() here leaked a cancelled item's in-flight chunk).
                if not item.dropped:
                    self._pending[item.priority] -= chunk.size
                if item.counted == item.num and not item.dropped:
                    _resolve(item.future, result=item.counts)
            if service_seconds > 0:
                rate = batch.size / service_seconds
                previous = self._rates.get(batch.model_id)
                self._rates[batch.model_id] = rate if previous is None else 0.9 * previous + 0.1 * rate

    def requeue(self, batch: Batch, error: BaseException) -> None:
        """The batch's device failed: put its chunks back for another executor (counts are unaffected).

        An item that came back more than MAX_REQUEUES times fails with ``error`` instead, so that an
        input that breaks every device does not circulate forever."""
        with self._cond:
            for item in set(batch.items):
                item.requeues += 1
            for item, chunk in zip(batch.items, batch.chunks, strict=True):
                if item.dropped:
                    continue
                if item.requeues > MAX_REQUEUES:
                    self._drop(item, error)
                    continue
                item.returned.append((chunk.start, chunk.stop))
                item.returned_samples += chunk.size
            self._cond.notify_all()

    def fail(self, batch: Batch, error: BaseException) -> None:
        """The forward pass raised: fail every item of the batch and drop its remaining work."""
        with self._cond:
            for item in set(batch.items):
                self._drop(item, error)

    # -- internals (call with the lock held) --------------------------------------------------

    def _level(self) -> float:
        """Where a class coming back from idle starts: the least-served busy class's weighted service, or with
        none busy the most-served class's (what the device did meanwhile is owed by nobody)."""
        busy = [self._weighted_service[p] for p in Priority if self._has_work(p)]
        return min(busy) if busy else max(self._weighted_service.values())

    def _has_work(self, priority: Priority) -> bool:
        return any(i.undispatched > 0 for i in self._queues[priority])

    def _backlog_seconds(self) -> dict[str, float]:
        # Queued items not dropped hold num - counted pending samples each (in-flight chunks included).
        pending: Counter[str] = Counter()
        for queue in self._queues.values():
            for item in queue:
                pending[item.model_id] += item.num - item.counted
        return {m: n / self._rates.get(m, ASSUMED_SAMPLES_PER_S) for m, n in pending.items() if n > 0}

    def _most_urgent(self) -> WorkItem | None:
        """The oldest item of the most urgent class with work that is at most FAIR_BURST weighted samples ahead
        of the least-served class with work."""
        busy = [p for p in Priority if self._has_work(p)]
        if not busy:
            return None
        least = min(self._weighted_service[p] for p in busy)
        lead_class = next(p for p in busy if self._weighted_service[p] <= least + FAIR_BURST)
        return min((i for i in self._queues[lead_class] if i.undispatched > 0), key=lambda i: i.arrival)

    def _fill(self, model_id: str, batch_size: int, classes: list[Priority]) -> Batch:
        items: list[WorkItem] = []
        chunks: list[Chunk] = []
        room = batch_size
        for priority in classes:
            queue = self._queues[priority]
            while room > 0:
                turn = [i for i in queue if i.model_id == model_id and i.undispatched > 0]
                if not turn:
                    break
                for item in turn:  # one chunk per item per turn, oldest-served first
                    if room == 0:
                        break
                    first, stop = item.take(min(self.chunk_size, room))
                    if items and items[-1] is item and chunks[-1].stop == first:
                        # The item's next range right after its last one (it is alone in its turn): one chunk,
                        # so that the batch costs one x + σ·ε and one input copy for it, not one per 128 samples.
                        chunks[-1] = replace(chunks[-1], stop=stop)
                    else:
                        chunks.append(Chunk(item.x, item.sigma, item.key, item.stage, first, stop))
                        items.append(item)
                    item.first_dispatch = item.first_dispatch or time.monotonic()
                    room -= stop - first
                    queue.remove(item)
                    queue.append(item)  # round-robin: served items go to the back
        return Batch(model_id, items, chunks)

    def _drop_finished_and_expired(self) -> None:
        now = time.monotonic()
        for queue in self._queues.values():
            for item in list(queue):
                if item.future.cancelled():
                    self._drop(item, None)
                elif item.deadline is not None and now > item.deadline and item.counted < item.num:
                    self._drop(item, DeadlineExceeded(f"deadline passed after {item.counted} of {item.num} samples"))
                elif item.counted == item.num and item.undispatched == 0:
                    queue.remove(item)

    def _drop(self, item: WorkItem, error: BaseException | None) -> None:
        queue = self._queues[item.priority]
        if item in queue:
            queue.remove(item)
            item.dropped = True
            self._pending[item.priority] -= item.num - item.counted
            item.counted = item.num  # nothing more will be counted for it
            item.dispatched = item.num
            item.returned.clear()
            item.returned_samples = 0
        if error is not None:
            _resolve(item.future, error=error)


def _resolve(future: Future, *, result: object = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless the client already cancelled it (a race we lose gracefully)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
