"""The certificate cache: Redis when configured, an in-process LRU otherwise.

A certificate is stored under a key made of everything that determines its distribution
(``certificate_key``) but never the seed. Only answers computed from server-drawn randomness are
stored or served: an answer from a client's seed never enters the cache, so no client can shop for
a lucky certificate and plant it for others.

Both caches never raise from ``get``/``put``: a cache that is down or slow turns into a miss
(``CACHE_REQUESTS{result="error"}``) and the request is answered without it. RedisCache logs
an outage once, skips Redis for a short back-off, and uses it again as soon as it answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import CACHE_REQUESTS
from smoothing.procedures import Question
from smoothing.sampling import input_digest

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "certserve:cert:v2:"  # bump the version when the stored value's layout changes
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)  # TimeoutError: redis-py's socket timeouts and ours


def certificate_key(*, manifest_digest: str, precision: str, question: Question, x: torch.Tensor) -> str:
    """The cache key of a certificate: a SHA-256 over everything that determines its distribution.

    That is the classifier (the manifest's content digest, weights' sha256 included) and the
    arithmetic actually run (``precision``), the question (procedure, its parameters and the
    server's procedure constants, ``Question.key_fields``) and the exact decoded input (x: (C, H, W)
    in [0, 1], by ``smoothing.sampling.input_digest``). Never the seed: only answers from
    server-drawn randomness are cached, and asking again returns the stored one.
    """
    params = {
        "manifest": manifest_digest,
        "precision": precision,
        "question": question.key_fields(),
        "shape": list(x.shape),
        "input": input_digest(x),
    }
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


class Cache(Protocol):
    async def get(self, key: str) -> dict | None:
        """The stored value, or None on a miss, an expired entry or a cache error (never raises)."""
        ...

    async def put(self, key: str, value: dict) -> None:
        """Store ``value`` (JSON-serialisable) for the cache's TTL; on error do nothing (never raises)."""
        ...

    async def ping(self) -> bool:
        """True if the cache answers now (readiness)."""
        ...

    async def close(self) -> None:
        """Release connections; the cache must not be used afterwards."""
        ...


def _encode(key: str, value: dict) -> str | None:
    """JSON text of ``value``, or None (logged, counted as an error) if it cannot be serialised."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        log.exception("cache value for %s is not JSON-serialisable; not cached", key)
        CACHE_REQUESTS.labels("error").inc()
        return None


class LruCache:
    """In-process cache: at most ``max_entries`` values, least recently used evicted first, each
    kept for at most ``ttl_s`` seconds (None = no expiry). Values are stored as JSON text, so a
    caller mutating a returned dict cannot change the cache, just as with Redis."""

    def __init__(self, max_entries: int, *, ttl_s: float | None = None) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expiry, JSON text)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> dict | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= time.monotonic():
            del self._entries[key]
            entry = None
        if entry is None:
            CACHE_REQUESTS.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        CACHE_REQUESTS.labels("hit").inc()
        return json.loads(entry[1])

    async def put(self, key: str, value: dict) -> None:
        text = _encode(key, value)
        if text is None:
            return
        expiry = time.monotonic() + self.ttl_s if self.ttl_s is not None else float("inf")
        self._entries[key] = (expiry, text)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Redis-backed cache (``SET key value PX ttl``), shared by every replica of the service.

    Every command is bounded by ``timeout_s`` (connect and read) and never retried: a slow
    answer is worth less than computing without the cache. After a failure Redis is skipped
    for ``backoff_s`` seconds (skipped gets and puts count as errors), then tried again; the outage is logged
    once when it starts and once when it ends.
    """

    def __init__(self, url: str, ttl_s: float, timeout_s: float = 0.05, *, backoff_s: float = 1.0) -> None:
        if ttl_s <= 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("ttl_s and timeout_s must be > 0 and backoff_s >= 0")
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._ttl_ms = max(1, round(ttl_s * 1000))  # PX rather than EX: sub-second TTLs work too
        # redis-py retries 3 times with exponential back-off by default: that would turn a down Redis into
        # seconds of latency per request, so retries are off and the outage logic below takes over.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        # The socket timeouts bound each read and connect; this bounds a whole command, which on a fresh
        # connection is a connect, a handshake (SELECT) and the command itself.
        self._command_timeout_s = 2 * timeout_s
        self._skip_until = 0.0  # time.monotonic() before which Redis is not tried
        self._outage_since: float | None = None

    async def get(self, key: str) -> dict | None:
        if self._backing_off():
            return None
        try:
            async with asyncio.timeout(self._command_timeout_s):
                raw = await self._client.get(key)
        except _REDIS_ERRORS as e:
            self._failed(e)
            return None
        self._recovered()
        if raw is None:
            CACHE_REQUESTS.labels("miss").inc()
            return None
        try:
            value = json.loads(raw)
        except ValueError:  # written by something else under our prefix: ignore, the next put overwrites it
            log.warning("cache entry %s is not JSON; treated as a miss", key)
            CACHE_REQUESTS.labels("error").inc()
            return None
        CACHE_REQUESTS.labels("hit").inc()
        return value

    async def put(self, key: str, value: dict) -> None:
        text = _encode(key, value)
        if text is None or self._backing_off():
            return
        try:
            async with asyncio.timeout(self._command_timeout_s):
                await self._client.set(key, text, px=self._ttl_ms)
        except _REDIS_ERRORS as e:
            self._failed(e)
            return
        self._recovered()

    async def ping(self) -> bool:
        """Ask Redis now, even during a back-off (readiness must see a recovery at once)."""
        try:
            async with asyncio.timeout(self._command_timeout_s):
                await self._client.ping()
        except _REDIS_ERRORS as e:
            self._failed(e, count=False)  # a probe is not a cache request
            return False
        self._recovered()
        return True

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except _REDIS_ERRORS:
            log.debug("error closing the Redis cache client", exc_info=True)

    @property
    def available(self) -> bool:
        """False while an outage is known and Redis has not answered since."""
        return self._outage_since is None

    def _backing_off(self) -> bool:
        if time.monotonic() < self._skip_until:
            CACHE_REQUESTS.labels("error").inc()
            return True
        return False

    def _failed(self, error: BaseException, *, count: bool = True) -> None:
        if count:
            CACHE_REQUESTS.labels("error").inc()
        now = time.monotonic()
        self._skip_until = now + self.backoff_s
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "Redis cache at %s unavailable (%s: %s); answering without the cache, retrying every %.1f s",
                _redacted(self.url),
                type(error).__name__,
                error,
                self.backoff_s,
            )

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.warning("Redis cache is back after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since = None


def _redacted(url: str) -> str:
    """The URL without its password, fit for a log line."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return scheme + sep + "***@" + rest.rpartition("@")[2]


def make_cache(settings: Settings) -> Cache:
    """RedisCache at ``settings.cache_redis_url`` or else ``settings.redis_url`` when one is set, else an
    LruCache of ``settings.cache_size`` entries; both keep entries for ``settings.cache_ttl_s`` seconds."""
    url = settings.cache_redis_url or settings.redis_url
    if url:
        return RedisCache(url, settings.cache_ttl_s)
    return LruCache(settings.cache_size, ttl_s=settings.cache_ttl_s)
