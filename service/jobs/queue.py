"""Batch jobs as Dramatiq messages on Redis: the broker, the one actor, and how a job becomes messages.

A job of ``total`` images becomes messages ``certify_range(job_id, start, stop)`` of
``CERTSERVE_JOB_MESSAGE_IMAGES`` images each: enough that a worker micro-batches across the
images it holds, few enough that one message ends well within ``CERTSERVE_JOB_TIME_LIMIT_S``.
Delivery is at least once (Dramatiq acknowledges a message after processing it, and a dead
worker's messages return to the queue once its heartbeat has timed out), which the job store's
first-writer-wins results make harmless. The API only sends; ``service.jobs.worker`` consumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from service.settings import Settings

QUEUE = "certserve-jobs"
ACTOR = "certify_range"
NAMESPACE = "certserve-dramatiq"  # prefix of the broker's Redis keys, beside the job store's certserve:job:
RETRY_BACKOFF_MS = (1_000, 60_000)  # a failing message is retried after 1 s, 2 s, 4 s, ... at most a minute

Enqueue = Callable[[str, int], Awaitable[None]]


def make_broker(settings: Settings) -> RedisBroker:
    """A Redis broker on CERTSERVE_REDIS_URL with the configured heartbeat timeout and maintenance chance."""
    return RedisBroker(
        url=settings.redis_url,
        namespace=NAMESPACE,
        heartbeat_timeout=settings.worker_heartbeat_timeout_ms,
        maintenance_chance=settings.worker_maintenance_chance,
    )


def declare_actor(broker: RedisBroker, settings: Settings, fn: Callable[[str, int, int], None]) -> dramatiq.Actor:
    """The ``certify_range(job_id, start, stop)`` actor on ``broker``, running ``fn`` where messages are consumed."""
    return dramatiq.actor(
        fn,
        broker=broker,
        actor_name=ACTOR,
        queue_name=QUEUE,
        time_limit=int(settings.job_time_limit_s * 1000),
        max_retries=settings.job_max_retries,
        min_backoff=RETRY_BACKOFF_MS[0],
        max_backoff=RETRY_BACKOFF_MS[1],
    )


def message_ranges(total: int, images_per_message: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges covering images 0 .. total - 1, ``images_per_message`` at a time."""
    return [(start, min(start + images_per_message, total)) for start in range(0, total, images_per_message)]


def _not_here(job_id: str, start: int, stop: int) -> None:
    raise RuntimeError("certify_range runs in `python -m service.jobs.worker`, not in the API")


def make_enqueue(settings: Settings) -> tuple[Enqueue, Callable[[], None]]:
    """The API's side: ``enqueue(job_id, total)`` sends a job's messages; the second function closes the broker."""
    broker = make_broker(settings)
    actor = declare_actor(broker, settings, _not_here)

    def send_all(job_id: str, total: int) -> None:
        for start, stop in message_ranges(total, settings.job_message_images):
            actor.send(job_id, start, stop)

    async def enqueue(job_id: str, total: int) -> None:
        await asyncio.to_thread(send_all, job_id, total)

    return enqueue, broker.close
