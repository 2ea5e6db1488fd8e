"""Batch certification jobs: an uploaded set of images certified in the background.

The unit of work is ``certify_image``: it reads the job's parameters from the store, certifies
one image through the engine at the lowest priority, and writes its result idempotently. The
in-process ``JobRunner`` drives it with a few images in flight per job (so that they share
forward passes); a distributed runner (e.g. Dramatiq workers) can call the same function with
(job id, idx) messages. Since every finished image is in the store, a restarted runner resumes
a job exactly where it stopped: finished images are neither repeated nor lost.

Image idx of a job is sampled with seed ``image_seed(job seed, idx)``, so a row can be
reproduced alone with ``smoothing.core.certify``.
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

import torch
from redis.exceptions import RedisError

from service import metrics
from service.engine.engine import Engine, Timing
from service.engine.scheduler import DeadlineExceeded, Priority, QueueFull
from service.jobs.store import (
    ACTIVE_STATES,
    JobRecord,
    JobStore,
)
from service.jobs.uploads import ParsedUpload
from smoothing.procedures import Question, Result, api_question, certificate_summary
from smoothing.sampling import derive_seed, new_seed

log = logging.getLogger(__name__)

RESUME_RETRY_S = 2.0
# What an unreachable store raises: Redis connection errors and timeouts, SQLite's operational errors.
STORE_ERRORS = (RedisError, OSError, sqlite3.Error)

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


def job_question(job: JobRecord, sigma: float) -> Question:
    """The procedure every image of ``job`` runs (a fixed-mode target radius changes nothing)."""
    mode = "fixed" if job.mode == "fixed" else "adaptive"
    radius = job.radius if job.mode == "radius" else None
    return api_question(mode, sigma=sigma, alpha=job.alpha, n0=job.n0, n=job.n, radius=radius, tolerance=job.tolerance)


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
    job = await store.get(job_id)
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
    if await store.put_result(job_id, row):
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


def _describe(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup):  # a failing image surfaces through the TaskGroup
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


class JobRunner:
    """Runs jobs in this process: ``concurrency`` images in flight per job, at Priority.JOB."""

    backend = "inprocess"  # the job backend label of certserve_job_backlog_images

    def __init__(self, store: JobStore, engine: Engine, *, concurrency: int = 8) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.engine = engine
        self.concurrency = concurrency
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resumer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resume every job the store holds as queued or running.

        A store that cannot be reached (Redis down at start-up) does not stop the service: the
        resumption is retried in the background every RESUME_RETRY_S seconds until it succeeds.
        """
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

    async def _run(self, job_id: str) -> None:
        try:
            inputs = await self.store.inputs(job_id)
            if inputs is None or not await self.store.set_state(job_id, "running"):
                return  # finished or cancelled meanwhile
            await self._publish_counts()
            finished = await self.store.done_indices(job_id)
            todo = deque(idx for idx in range(len(inputs.names)) if idx not in finished)

            async def worker() -> None:
                while todo:
                    if await certify_image(self.store, self.engine, job_id, todo.popleft(), inputs) is None:
                        return  # the job was cancelled (perhaps by another process)

            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.concurrency, len(todo))):
                    group.create_task(worker())
            await self.store.set_state(job_id, "done")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the job fails, the runner lives on
            log.exception("job %s failed", job_id)
            try:
                await self.store.set_state(job_id, "failed", error=_describe(e))
            except Exception:  # the store itself is down: the job stays unfinished and resumes on restart
                log.exception("job %s: could not record its failure", job_id)
        await self._publish_counts()

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
