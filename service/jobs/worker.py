"""A Dramatiq worker process for batch jobs: ``python -m service.jobs.worker``.

Reads the same CERTSERVE_* settings as the API (CERTSERVE_REDIS_URL is the broker and the job
store). One process per host: it loads its models once per device of CERTSERVE_DEVICES, in
this process and before any thread is started (it never forks, so no CUDA context is ever
inherited), and runs them through the same scheduler and executors as the API
(``service.engine.pool.start_engine``). Each message ``certify_range(job_id, start, stop)``
certifies its images concurrently, so they share forward passes, at job priority;
CERTSERVE_WORKER_THREADS messages run (and are prefetched) at once. Results are stored
first-writer-wins per (job, image): a redelivered message skips the images already stored, and
one that races another worker keeps the row written first, so a certificate is never replaced
and samples are never counted twice. Its Prometheus metrics (the service's, plus message and
image counts) are served on CERTSERVE_WORKER_METRICS_PORT. SIGTERM/SIGINT: stop fetching, hand
prefetched messages back, finish the running ones (up to CERTSERVE_SHUTDOWN_GRACE_S), exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware
from prometheus_client import Counter, start_http_server

from service.engine.engine import Engine
from service.engine.pool import load_settings_models, parse_devices, start_engine
from service.jobs.queue import declare_actor, make_broker
from service.jobs.runner import certify_image
from service.jobs.store import ACTIVE_STATES, JobStore, RedisJobStore
from service.jobs.uploads import ParsedUpload
from service.settings import Settings
from smoothing.runtime import keep_freed_memory

log = logging.getLogger(__name__)
T = TypeVar("T")

MESSAGES = Counter(
    "certserve_worker_messages",
    "job messages by outcome: processed, retried (failed, requeued with back-off), failed (retries exhausted)",
    ["outcome"],
)
IMAGES = Counter(
    "certserve_worker_images",
    "job images by outcome: certified (computed here), skipped (already stored: a redelivered message)",
    ["outcome"],
)
for _outcome in ("processed", "retried", "failed"):
    MESSAGES.labels(_outcome)
for _outcome in ("certified", "skipped"):
    IMAGES.labels(_outcome)
INPUT_CACHE_JOBS = 4  # jobs whose decoded inputs a worker keeps, so that a job's messages download them once
POLL_S = 0.5  # how often a message's thread looks up from waiting (Dramatiq's time limit interrupts only Python code)


class JobInputs:
    """The decoded inputs of the last few jobs, each downloaded once even when messages of a job start together."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._cache: OrderedDict[str, ParsedUpload] = OrderedDict()
        self._lock = asyncio.Lock()

    async def get(self, job_id: str) -> ParsedUpload | None:
        async with self._lock:
            if job_id not in self._cache:
                inputs = await self.store.inputs(job_id)
                if inputs is None:
                    return None
                self._cache[job_id] = inputs
                while len(self._cache) > INPUT_CACHE_JOBS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(job_id)
            return self._cache[job_id]


async def certify_range(store: JobStore, engine: Engine, inputs: JobInputs, job_id: str, start: int, stop: int) -> int:
    """Certify images [start, stop) of a job that have no result yet, together; return how many were computed.

    Skips a job that is unknown, cancelled or finished. Marks the job running at its first message and done
    once every image has a result."""
    job = await store.get(job_id)
    if job is None or job.state not in ACTIVE_STATES:
        return 0
    if job.state == "queued":
        await store.set_state(job_id, "running")
    images = await inputs.get(job_id)
    if images is None:  # finished meanwhile (a final state drops the inputs)
        return 0
    todo = await store.missing(job_id, list(range(start, min(stop, job.total))))
    IMAGES.labels("skipped").inc(stop - start - len(todo))
    rows = await asyncio.gather(*(certify_image(store, engine, job_id, idx, images) for idx in todo))
    computed = sum(row is not None for row in rows)
    IMAGES.labels("certified").inc(computed)
    if (await store.summary(job_id)).done >= job.total:
        await store.set_state(job_id, "done")
    return computed


class JobFailures(Middleware):
    """Counts messages by outcome; a message whose retries are exhausted marks its job failed."""

    def __init__(self, mark_failed: Callable[[str, str], None]) -> None:
        self.mark_failed = mark_failed

    def after_process_message(self, broker, message, *, result=None, exception=None) -> None:
        if exception is None:
            MESSAGES.labels("processed").inc()
        elif message.failed:  # the Retries middleware (before this one) gave up on it
            MESSAGES.labels("failed").inc()
            job_id, start, stop = message.args
            self.mark_failed(job_id, f"images [{start}, {stop}): {type(exception).__name__}: {exception}")
        else:
            MESSAGES.labels("retried").inc()


class Worker:
    """Models, pool, event loop and Dramatiq worker of one process; ``start`` then ``stop``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        slots = parse_devices(settings.devices, settings.threads)
        with ThreadPoolExecutor(1, thread_name_prefix="loader") as loader:  # its OpenMP team leaves with it
            models = loader.submit(load_settings_models, settings, slots).result()
        self.engine, self.pool = start_engine(settings, slots, models)
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True)
        self.store = RedisJobStore(settings.redis_url)
        self.inputs = JobInputs(self.store)
        self.broker = make_broker(settings)
        self.broker.add_middleware(CurrentMessage())
        self.broker.add_middleware(JobFailures(self._mark_failed))
        declare_actor(self.broker, settings, self._certify_range)
        self.dramatiq = dramatiq.Worker(self.broker, worker_threads=settings.worker_threads)
        self.dramatiq.queue_prefetch = settings.worker_threads  # hold no more messages than it runs: others share
        log.info("worker on %s: %s", ", ".join(s.name for s in slots), ", ".join(self.engine.models))

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the worker's loop and wait, cancelling it if this thread is interrupted
        (Dramatiq's time limit, shutdown)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            while True:
                try:
                    return future.result(timeout=POLL_S)
                except FutureTimeout:
                    continue
        except BaseException:
            future.cancel()
            raise

    def _certify_range(self, job_id: str, start: int, stop: int) -> None:
        computed = self._wait(certify_range(self.store, self.engine, self.inputs, job_id, start, stop))
        log.info("job %s images [%d, %d): %d certified", job_id, start, stop, computed)

    def _mark_failed(self, job_id: str, error: str) -> None:
        self._wait(self.store.set_state(job_id, "failed", error=error))

    def start(self) -> None:
        self._loop_thread.start()
        self.dramatiq.start()

    def stop(self) -> None:
        self.dramatiq.stop(timeout=int(self.settings.shutdown_grace_s * 1000))
        self.pool.stop()
        self._wait(self.store.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(5.0)
        self.broker.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    settings = Settings()
    if not settings.redis_url:
        raise SystemExit("python -m service.jobs.worker needs CERTSERVE_REDIS_URL (the broker and the job store)")
    keep_freed_memory()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    worker = Worker(settings)
    start_http_server(settings.worker_metrics_port)
    worker.start()
    log.info("consuming; metrics on :%d/metrics", settings.worker_metrics_port)
    while not stopping.wait(1.0):
        if not worker.pool.alive:
            log.error("no executor left alive: exiting, so that a supervisor restarts the worker")
            break
    log.info("stopping")
    worker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
