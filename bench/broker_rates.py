"""What a batch job costs outside the devices: Dramatiq sends, fetch + ack, result writes and result reads per second.

    python -m bench.broker_rates     # seconds; the Redis at 127.0.0.1:6379, database 4 (flushed before and after)

One client, one operation at a time, on loopback: the per-connection rate a worker or an API replica sees
(Redis itself serves many connections at once). Prints JSON; bench/results/workers/scaling.md uses it.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis

from service.jobs.queue import QUEUE, declare_actor, make_broker
from service.jobs.store import RedisJobStore
from service.settings import Settings

URL = "redis://127.0.0.1:6379/4"
COUNT = 2_000


async def store_rates() -> tuple[float, float]:
    """put_result (HSETNX + counters, one Lua call) per second, and result rows read per second."""
    store = RedisJobStore(URL)
    row = {"idx": 0, "abstained": False, "time": 1.0, "predict": 3, "radius": 0.5, "count_a": 9_000}
    started = time.perf_counter()
    for idx in range(COUNT):
        await store.put_result("bench", {**row, "idx": idx})
    put = COUNT / (time.perf_counter() - started)
    started = time.perf_counter()
    rows = await store.results("bench")
    read = len(rows) / (time.perf_counter() - started)
    await store.close()
    return put, read


def main() -> int:
    client = redis.Redis.from_url(URL)
    client.flushdb()
    settings = Settings(redis_url=URL, job_backend="dramatiq")
    broker = make_broker(settings)
    actor = declare_actor(broker, settings, lambda *args: None)
    started = time.perf_counter()
    for k in range(COUNT):
        actor.send("bench", k, k + 8)
    send = COUNT / (time.perf_counter() - started)
    consumer = broker.consume(QUEUE, prefetch=100, timeout=100)
    done, started = 0, time.perf_counter()
    while done < COUNT:
        message = next(consumer)
        if message is not None:
            consumer.ack(message)
            done += 1
    fetch_ack = COUNT / (time.perf_counter() - started)
    put, read = asyncio.run(store_rates())
    rates = {"send_per_s": send, "fetch_ack_per_s": fetch_ack, "put_result_per_s": put, "result_rows_read_per_s": read}
    print(json.dumps({k: round(v) for k, v in rates.items()}))
    broker.close()
    client.flushdb()
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
