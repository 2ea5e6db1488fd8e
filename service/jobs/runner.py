"""Batch certification jobs: an uploaded set of images certified in the background.

The unit of work is ``certify_image``: it reads the job's parameters from the store, certifies
one image through the engine at the lowest priority, and writes its result idempotently. With
the in-process backend the ``JobRunner`` drives it with a few images in flight per job (so that
they share forward passes); with the Dramatiq backend the runner only enqueues messages of image
ranges (service.jobs.queue) and worker processes call the same function (service.jobs.worker).
Since every finished image is in the store, a restarted runner resumes a job exactly where it
stopped: finished images are neither repeated nor lost.

Image idx of a job is sampled with seed ``image_seed(job seed, idx)``, so a row can be
reproduced alone with ``smoothing.core.certify``.

Store errors never fail a job. An unreachable store (Redis down, restarting, paused) is waited
out with back-off: a finished image's row is kept in memory and written once the store answers,
and a job whose run broke off on a store error starts again from the results the store holds.
Only the user (cancel) and the job's own images (an error computing one) end a job early, and
only then are its inputs deleted. A job the store no longer knows (Redis restarted without
persistence) is stopped: nothing more is computed or written for it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import metrics
from service.engine.engine import Engine, Timing
from service.engine.scheduler import DeadlineExceeded, Priority, QueueFull
from service.jobs.queue import Enqueue
from service.jobs.store import (
    ACTIVE_STATES,
    JobRecord,
    JobStore,
)
from service.jobs.uploads import ParsedUpload
from smoothing.procedures import Question, Result, api_question, certificate_summary
from smoothing.sampling import derive_seed, new_seed

log = logging.getLogger(__name__)
T = TypeVar("T")

RESUME_RETRY_S = 2.0  # longest wait between two tries of an unreachable store
FIRST_RETRY_S = 0.1
# What a failing store raises (answered 503 by the API): Redis errors, OS errors, SQLite's errors.
STORE_ERRORS = (RedisError, OSError, sqlite3.Error)
# Of those, what passes once the store is back: waited out, never a job's failure.
TRANSIENT_STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, sqlite3.OperationalError)

TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "samples")
ABSTAIN = -1  # the paper's "predict" for an abstention
DEADLINE_RETRIES = 3  # an image whose deadline passed (a flood of interactive work) is tried again this often


def image_seed(job_seed: int, idx: int) -> int:
    """The 63-bit sampling seed of image ``idx`` of a job seeded with ``job_seed``."""
    return derive_seed("job-image", job_seed, idx)


def owner_hash(api_key: str | None) -> str | None:
    """What the store keeps of the creator's API key (never the key itself); None without authentication."""
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()


def _visible(job: JobRecord | None, api_key: str | None) -> bool:
    if job is None:
        return False
    caller = owner_hash(api_key)
    if job.owner is None or caller is None:
        return job.owner is None and caller is None
    return hmac.compare_digest(job.owner, caller)


async def until_stored(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``await call()``, retried with back-off (FIRST_RETRY_S doubling up to RESUME_RETRY_S) for as long as
    the store raises a transient error; cancelling the caller stops the waiting."""
    delay, failed_since = FIRST_RETRY_S, None
    while True:
        try:
            result = await call()
        except TRANSIENT_STORE_ERRORS as e:
            if failed_since is None:
                failed_since = time.monotonic()
                log.warning("job store unreachable while %s (%s: %s); retrying", what, type(e).__name__, e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESUME_RETRY_S)
            continue
        if failed_since is not None:
            log.info("job store reachable again after %.1f s (%s)", time.monotonic() - failed_since, what)
        return result


def job_question(job: JobRecord, sigma: float) -> Question:
    """The procedure every image of ``job`` runs: the Question it was created with (``create`` stores its
    mode and tolerance; a fixed-mode target radius is stored for the rows' verdict and changes nothing)."""
    radius = job.radius if job.mode == "radius" else None
    return Question(job.mode, sigma, job.alpha, job.n, job.n0, radius=radius, tolerance=job.tolerance)


async def _certify(engine: Engine, job: JobRecord, x: torch.Tensor, seed: int) -> tuple[Result, Timing]:
    """The job's procedure on one image at job priority; waits out a full queue, retries a passed deadline."""
    question = job_question(job, engine.model(job.model_id).manifest.sigma)
    deadline_misses = 0
    while True:
        try:
            return await engine.run(job.model_id, x, question.procedure(), seed=seed, priority=Priority.JOB)
        except QueueFull as e:  # interactive traffic fills the queue: jobs are the ones that wait
            await asyncio.sleep(e.retry_after_s)
        except DeadlineExceeded:
            deadline_misses += 1
            if deadline_misses > DEADLINE_RETRIES:
                raise


async def certify_image(store: JobStore, engine: Engine, job_id: str, idx: int, inputs: ParsedUpload) -> dict | None:
    """Certify image ``idx`` of job ``job_id`` and store its result row; return the row.

    Returns None without computing when the job is unknown or no longer queued/running (e.g.
    cancelled). Storing is idempotent: if the image already has a result, the stored one stays
    and metrics are not counted twice. ``inputs`` are the job's inputs (``store.inputs``),
    passed in so that they are loaded once per job rather than once per image.
    """
    job = await until_stored(lambda: store.get(job_id), f"reading job {job_id}")
    if job is None or job.state not in ACTIVE_STATES:
        return None
    started = time.perf_counter()
    result, timing = await _certify(engine, job, inputs.images[idx], image_seed(job.seed, idx))
    seconds = time.perf_counter() - started
    summary = certificate_summary(result)
    label = inputs.labels[idx] if inputs.labels is not None else None
    abstained = summary["label"] is None
    certified_at_radius = summary.get("certified_at_radius")
    if job.mode == "fixed" and job.radius is not None:
        certified_at_radius = not abstained and summary["radius"] >= job.radius
    row = {
        "idx": idx,
        "name": inputs.names[idx],
        "label": label,
        "predict": summary["label"],
        "radius": summary["radius"],
        "correct": None if label is None else summary["label"] == label,
        "time": seconds,
        "abstained": abstained,
        "p_a_lower": summary["p_a_lower"],
        "count_a": summary["estimation_counts"][summary["top_class"]] if summary["top_class"] is not None else 0,
        "samples": summary["samples"],
        "certified_at_radius": certified_at_radius,
    }
    if await until_stored(lambda: store.put_result(job_id, row), f"storing image {idx} of job {job_id}"):
        metrics.record_certificate(job.model_id, abstained, summary["radius"], seconds, timing, endpoint="job")
        metrics.record_samples(summary["mode"], summary["samples"])
    return row


def results_tsv(rows: list[dict]) -> str:
    """Rows in the paper's log format plus the samples spent: ``idx label predict radius correct time samples``,
    tab-separated, with a header (``training.analyze`` reads the first six columns).

    An abstention is predict -1 (radius 0); an image without a label has label -1 and correct 0.
    ``time`` is seconds for the image.
    """
    lines = ["\t".join(TSV_COLUMNS)]
    for r in rows:
        predict = ABSTAIN if r["predict"] is None else r["predict"]
        label = -1 if r["label"] is None else r["label"]
        lines.append(
            f"{r['idx']}\t{label}\t{predict}\t{r['radius']:.4f}\t{int(bool(r['correct']))}\t{r['time']:.4f}"
            f"\t{r.get('samples', '')}"
        )
    return "\n".join(lines) + "\n"


def _iso(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat()


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):  # a failing image surfaces through the TaskGroup
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    error = _first(error)
    return f"{type(error).__name__}: {error}"


def _is_transient(error: BaseException) -> bool:
    return isinstance(_first(error), TRANSIENT_STORE_ERRORS)


class JobRunner:
    """Runs jobs in this process (``concurrency`` images in flight per job, at Priority.JOB), or, given
    ``enqueue`` (service.jobs.queue), hands them to Dramatiq workers: the routes see no difference."""

    def __init__(
        self, store: JobStore, engine: Engine, *, concurrency: int = 8, enqueue: Enqueue | None = None
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.engine = engine
        self.concurrency = concurrency
        self.enqueue = enqueue
        self.backend = "inprocess" if enqueue is None else "dramatiq"  # the label of certserve_job_backlog_images
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resumer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resume every job the store holds as queued or running.

        A store that cannot be reached (Redis down at start-up) does not stop the service: the
        resumption is retried in the background every RESUME_RETRY_S seconds until it succeeds.
        With Dramatiq workers there is nothing to resume here: the messages wait in Redis.
        """
        if self.enqueue is not None:
            await self._publish_counts()
            return
        try:
            await self._resume()
        except STORE_ERRORS as e:
            log.warning(
                "job store unreachable at start-up (%s: %s); resuming jobs once it is back", type(e).__name__, e
            )
            self._resumer = asyncio.create_task(self._resume_when_reachable(), name="resume-jobs")

    async def _resume(self) -> None:
        for job_id in await self.store.unfinished():
            self._launch(job_id)
        await self._publish_counts()

    async def _resume_when_reachable(self) -> None:
        while True:
            await asyncio.sleep(RESUME_RETRY_S)
            try:
                await self._resume()
            except STORE_ERRORS:
                continue
            log.info("job store reachable again: unfinished jobs resumed")
            return

    async def stop(self) -> None:
        """Stop running jobs (in-flight images are cancelled); they stay unfinished, for the next start()."""
        if self._resumer is not None:
            self._resumer.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def create(
        self,
        owner: str | None,
        parsed: ParsedUpload,
        model_id: str,
        n0: int,
        n: int,
        alpha: float,
        seed: int | None = None,
        *,
        mode: str = "fixed",
        radius: float | None = None,
        tolerance: float | None = None,
    ) -> str:
        """Store a new job and start it; return its id (unguessable). ``owner``: the caller's API key or None.

        ``mode``: the API's 'fixed' or 'adaptive' (with ``radius``: the radius decision; without: the
        adaptive certificate at ``tolerance``), as for /v1/certify.

        Raises UnknownModel for a model that is not loaded, ValueError for inputs of another
        shape than the model's or bad parameters.
        """
        manifest = self.engine.model(model_id).manifest
        if tuple(parsed.images.shape[1:]) != tuple(manifest.input_shape) or len(parsed.images) == 0:
            raise ValueError(f"job images {list(parsed.images.shape)} do not fit model input {manifest.input_shape}")
        if parsed.labels is not None and not all(0 <= label < manifest.num_classes for label in parsed.labels):
            bad = next(label for label in parsed.labels if not 0 <= label < manifest.num_classes)
            raise ValueError(
                f"label {bad} is not a class of model {manifest.id} (class indices 0 to {manifest.num_classes - 1})"
            )
        # Raises ValueError for bad parameters, before anything is stored.
        question = api_question(mode, sigma=manifest.sigma, alpha=alpha, n0=n0, n=n, radius=radius, tolerance=tolerance)
        now = time.time()
        job = JobRecord(
            id=secrets.token_urlsafe(16),
            owner=owner_hash(owner),
            model_id=model_id,
            n0=n0,
            n=n,
            alpha=alpha,
            seed=new_seed() if seed is None else seed,
            total=len(parsed.images),
            created=now,
            updated=now,
            mode=question.mode,
            radius=radius,
            tolerance=question.tolerance,
        )
        await self.store.create(job, parsed)
        if self.enqueue is not None:
            try:
                await self.enqueue(job.id, job.total)
            except Exception as e:  # the broker is down: no half-sent job stays queued forever
                await self.store.set_state(job.id, "failed", error=f"could not enqueue: {_describe(e)}")
                raise
        else:
            self._launch(job.id)
        await self._publish_counts()
        return job.id

    async def status(self, job_id: str, owner: str | None) -> dict | None:
        """State and progress, or None when the job does not exist for this owner.

        eta_s: mean seconds per finished image × images left / concurrency; None before the
        first image and for cancelled or failed jobs, 0 once done.
        """
        job = await self.store.get(job_id)
        if not _visible(job, owner):
            return None
        return await self._status(job)

    async def recent(self, owner: str | None, limit: int = 20) -> list[dict]:
        """The statuses of the newest ``limit`` jobs that ``owner`` (an API key or None) created, newest first."""
        return [await self._status(job) for job in await self.store.recent(owner_hash(owner), limit)]

    async def _status(self, job: JobRecord) -> dict:
        summary = await self.store.summary(job.id)
        eta_s = None
        if job.state == "done":
            eta_s = 0.0
        elif job.state in ACTIVE_STATES and summary.done > 0:
            eta_s = summary.seconds / summary.done * (job.total - summary.done) / self.concurrency
        return {
            "id": job.id,
            "state": job.state,
            "done": summary.done,
            "total": job.total,
            "abstentions": summary.abstentions,
            "eta_s": eta_s,
            "created": _iso(job.created),
            "updated": _iso(job.updated),
            "model_id": job.model_id,
            "params": {
                "n0": job.n0,
                "n": job.n,
                "alpha": job.alpha,
                "seed": job.seed,
                "mode": "fixed" if job.mode == "fixed" else "adaptive",
                "radius": job.radius,
                "tolerance": job.tolerance,
            },
            "error": job.error,
        }

    async def results(self, job_id: str, owner: str | None) -> list[dict] | None:
        """Result rows by idx (idx, name, label, predict, radius, correct, time, ...), or None when not visible.

        predict is None for an abstention; label and correct are None without labels.
        """
        if not _visible(await self.store.get(job_id), owner):
            return None
        return await self.store.results(job_id)

    async def cancel(self, job_id: str, owner: str | None) -> bool:
        """Cancel an unfinished job: remaining images are skipped, in-flight ones cancelled.

        False when the job does not exist for this owner; a finished job keeps its state.
        """
        if not _visible(await self.store.get(job_id), owner):
            return False
        if await self.store.set_state(job_id, "cancelled"):
            await self._publish_counts()
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return True

    def _launch(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    def running(self) -> list[str]:
        """Ids of the jobs this process is working on now."""
        return list(self._tasks)

    async def _run(self, job_id: str) -> None:
        delay = FIRST_RETRY_S
        while True:
            try:
                await self._run_once(job_id)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if _is_transient(e):  # the store went away mid-run: start again from what it holds, once back
                    log.warning("job %s paused, the job store is unreachable (%s); resuming", job_id, _describe(e))
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RESUME_RETRY_S)
                    continue
                log.exception("job %s failed", job_id)  # its own images' error: the job fails, the runner lives on
                await until_stored(
                    lambda e=e: self.store.set_state(job_id, "failed", error=_describe(e)), f"failing job {job_id}"
                )
                break
        await self._publish_counts()

    async def _run_once(self, job_id: str) -> None:
        """Certify every image of the job that has no result yet, then mark it done; return early if the
        job is cancelled or unknown. Store errors propagate (``_run`` waits and calls again)."""
        inputs = await self.store.inputs(job_id)
        if inputs is None or not await self.store.set_state(job_id, "running"):
            return  # finished, cancelled or gone meanwhile
        await self._publish_counts()
        while True:  # until the store holds every row (a result written just before a crash may be lost)
            job = await self.store.get(job_id)
            if job is None or job.state not in ACTIVE_STATES:
                return
            finished = await self.store.done_indices(job_id)
            todo = deque(idx for idx in range(len(inputs.names)) if idx not in finished)
            if not todo:
                break

            async def worker(todo: deque[int] = todo) -> None:
                while todo:
                    if await certify_image(self.store, self.engine, job_id, todo.popleft(), inputs) is None:
                        return  # the job was cancelled (perhaps by another process) or is gone

            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.concurrency, len(todo))):
                    group.create_task(worker())
        await self.store.set_state(job_id, "done")

    async def refresh_metrics(self, timeout_s: float = 1.0) -> bool:
        """Read the job gauges from the store now (at a scrape), waiting at most ``timeout_s``; False if it failed."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._publish_counts()
        except TimeoutError:
            log.warning("job counts unavailable: the store did not answer within %.1f s", timeout_s)
            return False

    async def _publish_counts(self) -> bool:
        """Set the jobs-by-state and job-backlog gauges from the store (all processes' jobs, not only this
        one's); False if the store could not be read."""
        try:
            counts = await self.store.count_by_state()
            backlog = await self.store.backlog()
        except Exception as e:  # a metric is not worth failing a job or a request for
            log.warning("job counts unavailable: %s", e)
            return False
        for state, count in counts.items():
            metrics.JOBS.labels(state).set(count)
        metrics.JOB_BACKLOG.labels(self.backend).set(backlog)
        return True
