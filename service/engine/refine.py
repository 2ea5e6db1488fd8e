"""Run-time refinement of a model's throughput batch size from an executor's own timings of real batches.

The load-time sweep (smoothing.tuning) may have run on a busy machine, and a cached plan comes
from another start: both are starting points. While it serves, an executor times every batch
anyway; a ``BatchRefiner`` per (executor, model) turns those timings into a decision:

- Only *full* batches count: one the queue could not fill to the size asked for says how much
  work there was, not how fast the device is.
- Now and then (after every ``explore_every`` full batches at the current size, that is while
  the model is saturated) the next batch is asked at a neighbouring candidate size, the lower and
  the upper one in turn, and paired with the full batch just before it: the two see the same load
  of a shared machine. The first batch at a size is a warm-up and not counted.
- The batch size moves to a neighbour when two statistics of its last tries (at least ``pairs`` of
  them) both say it is REVALIDATE_GAIN faster, the margin by which a cached plan moves at start:
  the median of the pairs' ratios (a stall, or a change of the machine's load, spoils a few pairs
  only) and the fastest of its tries over the fastest of their partners (the sweep's rule: a busy
  machine only ever slows a batch down, so the fastest is the estimate). The median alone moved
  back and forth on the busy 2-core machine (with 5 tries; most batches there are slowed a little,
  so a ratio of two is noisy both ways; one executor went 256 → 128 → 256 within 4 s); the maxima
  alone moved when the machine's load changed between two tries (the fastest try from before the
  change, its partner stalled). A size that is not clearly faster does not win, so sizes of equal
  speed do not take turns.

Batch size never changes an answer (noise comes in seeded blocks, smoothing.sampling), and the
sizes are the tuner's candidates (CPU_BATCH_SIZES / GPU_BATCH_SIZES, powers of two, so multiples of
the noise block from 128 on, as at load time), so refinement is safe while requests are in flight.
Precision is not refined: the answers and the cache keys name the precision run, and switching it
mid-flight would change them; it is chosen and re-validated at start only.

Pure logic (no torch, no clock): the executor feeds it (batch size asked for, size run, seconds).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence

from smoothing.tuning import CPU_BATCH_SIZES, GPU_BATCH_SIZES, REVALIDATE_GAIN

EXPLORE_EVERY = 16  # full batches at the current size between two tries of a neighbour (≈ 6 % of the batches)
PAIRS = 9  # tries a neighbour needs before it can win
WINDOW = 15  # tries (and rates) kept per size: the last ones, so that the statistic follows the machine


class BatchRefiner:
    """The throughput batch size of one model on one executor, refined from the timings of its full batches.

    ``batch_size``: where it starts (the plan's). ``candidates``: the sizes it may move to; the start is
    one of them even when it is not in the list. Call ``propose`` for the size to ask the scheduler for,
    then ``observe`` with what came back; ``observe`` returns the new batch size when it moved, else None.
    """

    def __init__(
        self,
        batch_size: int,
        candidates: Sequence[int],
        *,
        explore_every: int = EXPLORE_EVERY,
        pairs: int = PAIRS,
        window: int = WINDOW,
        gain: float = REVALIDATE_GAIN,
    ) -> None:
        if batch_size <= 0 or explore_every < 1 or not 1 <= pairs <= window or gain <= 1.0:
            raise ValueError("need batch_size > 0, explore_every >= 1, 1 <= pairs <= window and gain > 1")
        self.batch_size = batch_size
        self.sizes = tuple(sorted({*candidates, batch_size}))
        self.explore_every = explore_every
        self.pairs = pairs
        self.window = window
        self.gain = gain
        self._rates: deque[float] = deque(maxlen=window)  # samples/s of the last full batches at batch_size
        # Per neighbour: (its rate, the rate of the full batch at batch_size just before it) of its last tries.
        self._pairs: dict[int, deque[tuple[float, float]]] = {}
        self._warm: set[int] = {batch_size}  # sizes that already ran once (the first run is a warm-up)
        self._since_try = 0  # full batches at batch_size since the last try of a neighbour
        self._last_rate: float | None = None  # the latest batch's rate, if it was full and at batch_size
        self._turn = 0  # which neighbour the next try is for
        self._estimate: float | None = None  # right after a move: the old size's rate × the winning score

    @property
    def neighbours(self) -> tuple[int, ...]:
        """The candidate sizes just below and just above the current one (one at either end)."""
        at = self.sizes.index(self.batch_size)
        return self.sizes[max(0, at - 1) : at] + self.sizes[at + 1 : at + 2]

    @property
    def samples_per_second(self) -> float | None:
        """Median rate of the last full batches at the current size; right after a move, before the new size's
        own batches, the old size's rate times the winning score; None before the first full batch."""
        return statistics.median(self._rates) if self._rates else self._estimate

    def propose(self) -> int:
        """The size to ask for next: a neighbour's turn right after a full batch once ``explore_every`` full
        batches ran since the last try, else the current size. No side effect (it may be asked again)."""
        neighbours = self.neighbours
        if self._last_rate is not None and self._since_try >= self.explore_every and neighbours:
            return neighbours[self._turn % len(neighbours)]
        return self.batch_size

    def observe(self, asked: int, size: int, seconds: float) -> int | None:
        """A batch asked at ``asked`` samples ran ``size`` samples in ``seconds``; the new batch size if it moved."""
        if size < asked or seconds <= 0:  # the queue could not fill it: nothing about speed
            self._last_rate = None
            return None
        rate = size / seconds
        if asked == self.batch_size:
            self._rates.append(rate)
            self._last_rate = rate
            self._since_try += 1
            return None
        before, self._last_rate = self._last_rate, None
        if asked not in self.neighbours or before is None:
            return None  # not a try of ours (or not right after a full batch): no pair
        self._since_try = 0
        self._turn += 1
        if asked not in self._warm:
            self._warm.add(asked)
            return None
        self._pairs.setdefault(asked, deque(maxlen=self.window)).append((rate, before))
        return self._decide()

    def score(self, size: int) -> float | None:
        """How much faster the neighbour ``size`` ran than the current size, the lesser of two estimates over its
        last tries: the median of (its rate ÷ the full batch's just before it), and the fastest of its tries over
        the fastest of those batches; None before it has ``pairs`` tries."""
        pairs = self._pairs.get(size, ())
        if len(pairs) < self.pairs:
            return None
        median = statistics.median(rate / before for rate, before in pairs)
        fastest = max(rate for rate, _ in pairs) / max(before for _, before in pairs)
        return min(median, fastest)

    def interrupt(self) -> None:
        """A batch of the model ran at a size not proposed here (the interactive one): the next try waits for a
        fresh full batch at the current size, so that its pair is adjacent."""
        self._last_rate = None

    def failed(self, asked: int) -> None:
        """A try at ``asked`` raised (e.g. out of device memory): never try that size again."""
        if asked != self.batch_size and asked in self.sizes:
            self.sizes = tuple(s for s in self.sizes if s != asked)
            self._pairs.pop(asked, None)
            self._since_try = 0
            self._last_rate = None

    def _decide(self) -> int | None:
        scores = {b: score for b in self._pairs if (score := self.score(b)) is not None}
        if not scores:
            return None
        best = max(scores, key=scores.__getitem__)
        if scores[best] < self.gain:
            return None
        rate = self.samples_per_second
        self._estimate = None if rate is None else rate * scores[best]
        self.batch_size = best
        # Pairs were with the old size: the new one's neighbours start afresh (the old size must win back).
        self._pairs.clear()
        self._rates.clear()
        self._since_try = 0
        self._turn = 0
        return best


def candidates_for(device_type: str, max_batch: int = 0) -> tuple[int, ...]:
    """The sizes refinement may move to on a device of ``device_type``: the tuner's, at most ``max_batch``
    (CERTSERVE_MAX_BATCH; 0 = no cap)."""
    sizes = GPU_BATCH_SIZES if device_type == "cuda" else CPU_BATCH_SIZES
    return tuple(s for s in sizes if not max_batch or s <= max_batch)
