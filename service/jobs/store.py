"""Where batch jobs live: one record per job, its input images, and one result per (job, image).

Two stores behind one protocol: ``SqliteJobStore`` (an embedded file, the default) and
``RedisJobStore``. Results are written idempotently (INSERT OR IGNORE / HSETNX): an image that
is certified twice (a resumed job, a redelivered worker message) is recorded and counted once.
A job leaves ``queued``/``running`` at most once; its input images are dropped when it does.

The Redis store rides out short outages itself: connections are health-checked before use after
``HEALTH_CHECK_S`` idle seconds (a pooled connection that Redis closed while it was down is
replaced instead of failing the first command after it comes back), and a command that meets a
connection error or a timeout is retried with exponential back-off (``STORE_RETRIES`` times,
redis-py's ``Retry``). What outlasts that is the runner's business (``service.jobs.runner``).
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs.uploads import ParsedUpload

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "cancelled", "failed")
STATES = ACTIVE_STATES + FINAL_STATES
REDIS_PREFIX = "certserve:job:"
HEALTH_CHECK_S = 1  # a connection idle this long is PINGed before its next command
STORE_RETRIES = 6  # back-off 0.1, 0.2, ... capped at 2 s: about 6 s of outage absorbed per command
STORE_TIMEOUT_S = 10.0  # per socket read/connect: a paused Redis surfaces as a timeout, not a hang
T = TypeVar("T")


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str | None  # sha256 (hex) of the creator's API key; None when authentication is off
    model_id: str
    n0: int
    n: int
    alpha: float
    seed: int  # image idx is sampled with seed image_seed(seed, idx)
    total: int  # number of images
    state: str = "queued"
    created: float = 0.0  # unix seconds
    updated: float = 0.0
    error: str | None = None
    mode: str = "fixed"  # smoothing.procedures.Question mode: 'fixed', 'radius' or 'adaptive'
    radius: float | None = None  # the target radius ('radius'; in 'fixed' it only adds a verdict per row)
    tolerance: float | None = None  # 'adaptive' only


@dataclass(frozen=True)
class JobSummary:
    """Aggregates of a job's results so far."""

    done: int
    abstentions: int
    seconds: float  # per-image wall-clock time, summed


class JobStore(Protocol):
    async def create(self, job: JobRecord, inputs: ParsedUpload) -> None: ...
    async def get(self, job_id: str) -> JobRecord | None: ...
    async def inputs(self, job_id: str) -> ParsedUpload | None: ...
    async def set_state(self, job_id: str, state: str, error: str | None = None) -> bool:
        """Move an unfinished job to ``state``; False (and no change) if it is unknown or already finished."""
        ...

    async def put_result(self, job_id: str, row: dict[str, Any]) -> bool:
        """Store ``row`` (with keys idx, abstained, time) unless image ``row['idx']`` has one or the job is
        unknown; True if stored."""
        ...

    async def results(self, job_id: str) -> list[dict[str, Any]]: ...
    async def done_indices(self, job_id: str) -> set[int]: ...
    async def missing(self, job_id: str, indices: list[int]) -> list[int]:
        """The ones of ``indices`` that have no result yet, in order."""
        ...

    async def summary(self, job_id: str) -> JobSummary: ...
    async def unfinished(self) -> list[str]: ...
    async def recent(self, owner: str | None, limit: int) -> list[JobRecord]:
        """The newest ``limit`` jobs of ``owner`` (an owner hash, or None for jobs made without a key), newest first."""
        ...

    async def count_by_state(self) -> dict[str, int]: ...
    async def backlog(self) -> int:
        """Images of queued or running jobs that have no result yet."""
        ...

    async def close(self) -> None: ...


def encode_inputs(inputs: ParsedUpload) -> bytes:
    """The inputs as a compressed .npz; images as uint8 when that is exact (decoded 8-bit images), else float32."""
    images = inputs.images.contiguous()
    as_bytes = images.mul(255.0).round_().to(torch.uint8)
    exact = torch.equal(as_bytes.to(torch.float32).div_(255.0), images)
    arrays = {"images": (as_bytes if exact else images).numpy(), "names": np.array(inputs.names, dtype=str)}
    if inputs.labels is not None:
        arrays["labels"] = np.array(inputs.labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def decode_inputs(blob: bytes) -> ParsedUpload:
    """Inverse of ``encode_inputs``; the images come back bit for bit."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
        images = torch.from_numpy(arrays["images"])
        labels = [int(v) for v in arrays["labels"]] if "labels" in arrays else None
        names = [str(v) for v in arrays["names"]]
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255.0)
    return ParsedUpload(images, labels, names)


# -- SQLite ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT, model_id TEXT NOT NULL, n0 INTEGER NOT NULL, n INTEGER NOT NULL,
    alpha REAL NOT NULL, seed INTEGER NOT NULL, total INTEGER NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, error TEXT,
    mode TEXT NOT NULL DEFAULT 'fixed', radius REAL, tolerance REAL
);
CREATE TABLE IF NOT EXISTS job_inputs (job_id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS job_results (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, abstained INTEGER NOT NULL, seconds REAL NOT NULL,
    row TEXT NOT NULL, PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
"""
_JOB_COLUMNS = "id, owner, model_id, n0, n, alpha, seed, total, state, created, updated, error, mode, radius, tolerance"
# Columns added after the first release, for files written by it: (name, declaration).
_ADDED_COLUMNS = (("mode", "TEXT NOT NULL DEFAULT 'fixed'"), ("radius", "REAL"), ("tolerance", "REAL"))
_ACTIVE_SQL = "('queued', 'running')"


class SqliteJobStore:
    """Jobs in one SQLite file (WAL mode), which survives restarts. Calls run in threads, one at a time."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock, self._db:  # one transaction per call, committed on success
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def create(self, job: JobRecord, inputs: ParsedUpload) -> None:
        blob = await asyncio.to_thread(encode_inputs, inputs)

        def insert() -> None:
            values = [getattr(job, c) for c in _JOB_COLUMNS.split(", ")]
            self._db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
            self._db.execute("INSERT INTO job_inputs (job_id, data) VALUES (?, ?)", (job.id, blob))

        await self._call(insert)

    async def get(self, job_id: str) -> JobRecord | None:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
        row = await self._call(lambda: self._db.execute(sql, (job_id,)).fetchone())
        return None if row is None else JobRecord(*row)

    async def inputs(self, job_id: str) -> ParsedUpload | None:
        sql = "SELECT data FROM job_inputs WHERE job_id = ?"
        row = await self._call(lambda: self._db.execute(sql, (job_id,)).fetchone())
        return None if row is None else await asyncio.to_thread(decode_inputs, row[0])

    async def set_state(self, job_id: str, state: str, error: str | None = None) -> bool:
        def update() -> bool:
            changed = self._db.execute(
                f"UPDATE jobs SET state = ?, updated = ?, error = COALESCE(?, error) "
                f"WHERE id = ? AND state IN {_ACTIVE_SQL}",
                (state, time.time(), error, job_id),
            ).rowcount
            if changed and state in FINAL_STATES:
                self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
            return changed == 1

        return await self._call(update)

    async def put_result(self, job_id: str, row: dict[str, Any]) -> bool:
        values = (job_id, row["idx"], int(row["abstained"]), row["time"], json.dumps(row))
        sql = (
            "INSERT OR IGNORE INTO job_results (job_id, idx, abstained, seconds, row) "
            "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)"
        )
        return await self._call(lambda: self._db.execute(sql, (*values, job_id)).rowcount == 1)

    async def results(self, job_id: str) -> list[dict[str, Any]]:
        sql = "SELECT row FROM job_results WHERE job_id = ? ORDER BY idx"
        rows = await self._call(lambda: self._db.execute(sql, (job_id,)).fetchall())
        return [json.loads(r[0]) for r in rows]

    async def done_indices(self, job_id: str) -> set[int]:
        sql = "SELECT idx FROM job_results WHERE job_id = ?"
        rows = await self._call(lambda: self._db.execute(sql, (job_id,)).fetchall())
        return {r[0] for r in rows}

    async def missing(self, job_id: str, indices: list[int]) -> list[int]:
        sql = f"SELECT idx FROM job_results WHERE job_id = ? AND idx IN ({', '.join('?' * len(indices))})"
        rows = await self._call(lambda: self._db.execute(sql, (job_id, *indices)).fetchall())
        done = {r[0] for r in rows}
        return [i for i in indices if i not in done]

    async def summary(self, job_id: str) -> JobSummary:
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(abstained), 0), COALESCE(SUM(seconds), 0.0) "
            "FROM job_results WHERE job_id = ?"
        )
        done, abstentions, seconds = await self._call(lambda: self._db.execute(sql, (job_id,)).fetchone())
        return JobSummary(done, abstentions, seconds)

    async def unfinished(self) -> list[str]:
        sql = f"SELECT id FROM jobs WHERE state IN {_ACTIVE_SQL} ORDER BY created"
        return [r[0] for r in await self._call(lambda: self._db.execute(sql).fetchall())]

    async def recent(self, owner: str | None, limit: int) -> list[JobRecord]:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner IS ? ORDER BY created DESC LIMIT ?"
        rows = await self._call(lambda: self._db.execute(sql, (owner, limit)).fetchall())
        return [JobRecord(*row) for row in rows]

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._call(lambda: self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: 0 for state in STATES} | dict(rows)

    async def backlog(self) -> int:
        sql = (
            "SELECT COALESCE(SUM(j.total - (SELECT COUNT(*) FROM job_results r WHERE r.job_id = j.id)), 0) "
            f"FROM jobs j WHERE j.state IN {_ACTIVE_SQL}"
        )
        return (await self._call(lambda: self._db.execute(sql).fetchone()))[0]

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                self._db.close()

        await asyncio.to_thread(close)


# -- Redis -----------------------------------------------------------------------------------

# Atomic, so that a result and the counters it moves are written together or not at all. A job that is
# gone (a Redis restarted without persistence) gets no result: no orphan keys for a job nobody can see.
_PUT_RESULT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], 'done', 1)
redis.call('HINCRBY', KEYS[2], 'abstentions', ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[2], 'seconds', ARGV[4])
return 1
"""
# KEYS: job hash, active set, state counts, inputs. ARGV: new state, unix time, error ('' = keep), job id.
_SET_STATE = """
local current = redis.call('HGET', KEYS[1], 'state')
if current ~= 'queued' and current ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if current ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[3], current, -1)
  redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
end
if ARGV[1] ~= 'queued' and ARGV[1] ~= 'running' then
  redis.call('SREM', KEYS[2], ARGV[4])
  redis.call('DEL', KEYS[4])
end
return 1
"""


class RedisJobStore:
    """Jobs in Redis under ``certserve:job:``: ``<id>`` (record hash with done/abstentions/seconds
    counters), ``<id>:results`` (idx → JSON row), ``<id>:inputs`` (.npz), plus ``active`` (set of
    unfinished ids), ``states`` (job counts per state) and ``owner:<owner hash or '-'>`` (the
    owner's job ids by creation time)."""

    def __init__(self, url: str) -> None:
        self._redis = aioredis.from_url(
            url,
            health_check_interval=HEALTH_CHECK_S,
            socket_timeout=STORE_TIMEOUT_S,
            socket_connect_timeout=STORE_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), STORE_RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._put_result = self._redis.register_script(_PUT_RESULT)
        self._set_state = self._redis.register_script(_SET_STATE)

    @staticmethod
    def _key(job_id: str, part: str = "") -> str:
        return f"{REDIS_PREFIX}{job_id}{':' + part if part else ''}"

    def _owner_key(self, owner: str | None) -> str:
        return self._key("owner", owner or "-")  # an owner hash is hex: never "-"

    async def create(self, job: JobRecord, inputs: ParsedUpload) -> None:
        blob = await asyncio.to_thread(encode_inputs, inputs)
        fields = {k: v for k, v in vars(job).items() if v is not None}
        fields |= {"done": 0, "abstentions": 0, "seconds": 0.0}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job.id), mapping=fields)
            pipe.set(self._key(job.id, "inputs"), blob)
            pipe.sadd(self._key("active"), job.id)
            pipe.hincrby(self._key("states"), job.state, 1)
            pipe.zadd(self._owner_key(job.owner), {job.id: job.created})
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.hgetall(self._key(job_id))
        f = {k.decode(): v.decode() for k, v in raw.items()}
        if "id" not in f:  # unknown, or only counters (written by a version without the EXISTS guard)
            return None
        return JobRecord(
            id=f["id"],
            owner=f.get("owner"),
            model_id=f["model_id"],
            n0=int(f["n0"]),
            n=int(f["n"]),
            alpha=float(f["alpha"]),
            seed=int(f["seed"]),
            total=int(f["total"]),
            state=f["state"],
            created=float(f["created"]),
            updated=float(f["updated"]),
            error=f.get("error"),
            mode=f.get("mode", "fixed"),
            radius=float(f["radius"]) if "radius" in f else None,
            tolerance=float(f["tolerance"]) if "tolerance" in f else None,
        )

    async def inputs(self, job_id: str) -> ParsedUpload | None:
        blob = await self._redis.get(self._key(job_id, "inputs"))
        return None if blob is None else await asyncio.to_thread(decode_inputs, blob)

    async def set_state(self, job_id: str, state: str, error: str | None = None) -> bool:
        keys = [self._key(job_id), self._key("active"), self._key("states"), self._key(job_id, "inputs")]
        return bool(await self._set_state(keys=keys, args=[state, time.time(), error or "", job_id]))

    async def put_result(self, job_id: str, row: dict[str, Any]) -> bool:
        keys = [self._key(job_id, "results"), self._key(job_id)]
        args = [row["idx"], json.dumps(row), int(row["abstained"]), row["time"]]
        return bool(await self._put_result(keys=keys, args=args))

    async def results(self, job_id: str) -> list[dict[str, Any]]:
        rows = [json.loads(v) for v in (await self._redis.hgetall(self._key(job_id, "results"))).values()]
        return sorted(rows, key=lambda r: r["idx"])

    async def done_indices(self, job_id: str) -> set[int]:
        return {int(k) for k in await self._redis.hkeys(self._key(job_id, "results"))}

    async def missing(self, job_id: str, indices: list[int]) -> list[int]:
        rows = await self._redis.hmget(self._key(job_id, "results"), indices) if indices else []
        return [i for i, row in zip(indices, rows, strict=True) if row is None]

    async def summary(self, job_id: str) -> JobSummary:
        done, abstentions, seconds = await self._redis.hmget(self._key(job_id), ["done", "abstentions", "seconds"])
        return JobSummary(int(done or 0), int(abstentions or 0), float(seconds or 0.0))

    async def unfinished(self) -> list[str]:
        ids = [v.decode() for v in await self._redis.smembers(self._key("active"))]
        created = [await self._redis.hget(self._key(i), "created") for i in ids]
        return [i for c, i in sorted(zip(created, ids, strict=True), key=lambda p: float(p[0] or 0))]

    async def recent(self, owner: str | None, limit: int) -> list[JobRecord]:
        ids = [v.decode() for v in await self._redis.zrevrange(self._owner_key(owner), 0, limit - 1)]
        jobs = [await self.get(job_id) for job_id in ids]
        return [job for job in jobs if job is not None]

    async def count_by_state(self) -> dict[str, int]:
        raw = await self._redis.hgetall(self._key("states"))
        return {state: 0 for state in STATES} | {k.decode(): int(v) for k, v in raw.items()}

    async def backlog(self) -> int:
        ids = [v.decode() for v in await self._redis.smembers(self._key("active"))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._key(job_id), ["total", "done"])
            rows = await pipe.execute()
        return sum(int(total or 0) - int(done or 0) for total, done in rows)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
