"""A load generator that costs little CPU per request: pre-encoded HTTP/1.1 requests on raw asyncio connections.

Why not httpx: the benchmark's client shares the CPU with the servers it measures. httpx spends
milliseconds of CPU per request (building the request, JSON-encoding the body, and its connection
pool scanning every pooled connection for each request: with a few hundred connections left over
from a burst, that scan alone took ~10 ms per request, see bench/findings.md). Here every request
is encoded to bytes before the clock starts, and an answer is read by parsing only its status line
and Content-Length; the body is kept as bytes for the caller to decode after the clock stops.

Connections are keep-alive. ``run_schedule`` sends each request on a connection of its own while
it is in flight (opened before the clock, reused once its answer is back); ``Connection.pipeline``
writes several requests before reading their answers, which HTTP/1.1 answers in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench.client import Body, new_client, post

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024


class ProtocolError(Exception):
    """An answer this client cannot read (no Content-Length, a malformed status line)."""


def host_port(url: str) -> tuple[str, int]:
    """``http://host:port`` → (host, port)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"need an http://host:port URL, got {url!r}")
    return parts.hostname, parts.port or 80


def encode_request(
    method: str, url: str, path: str, body: bytes = b"", content_type: str = "application/json"
) -> bytes:
    """One HTTP/1.1 request as bytes (keep-alive; a Content-Length whenever there is a body or it is a POST)."""
    host, port = host_port(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def encode_json_post(url: str, path: str, body: object) -> bytes:
    """A POST of ``body`` as compact JSON."""
    return encode_request("POST", url, path, json.dumps(body, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    keep_alive: bool  # False when the server said Connection: close

    def json(self) -> object:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """Read one response: its status line and Content-Length from the head, then exactly that many bytes."""
    try:
        head = await reader.readuntil(HEAD_END)
    except asyncio.LimitOverrunError as e:
        raise ProtocolError(f"response head longer than {MAX_HEAD_BYTES} bytes") from e
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise ProtocolError(f"not an HTTP/1.x status line: {head[:40]!r}")
    status = int(head[9:12])
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        raise ProtocolError("response without Content-Length (chunked answers are not read by this client)")
    end = lowered.index(b"\r\n", at + 2)
    length = int(lowered[at + 17 : end])
    body = await reader.readexactly(length) if length else b""
    return Answer(status, body, b"\r\nconnection: close" not in lowered)


class Connection:
    """One keep-alive TCP connection; requests on it are answered in the order they were sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.open = True

    @classmethod
    async def connect(cls, url: str) -> Connection:
        host, port = host_port(url)
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> Answer:
        """Send one request and read its answer."""
        self.writer.write(request)
        answer = await read_answer(self.reader)
        self.open = answer.keep_alive
        return answer

    async def pipeline(self, requests: list[bytes]) -> list[Answer]:
        """Write every request, then read the answers, in the same order."""
        self.writer.write(b"".join(requests))
        answers = [await read_answer(self.reader) for _ in requests]
        self.open = all(a.keep_alive for a in answers)
        return answers

    async def close(self) -> None:
        self.open = False
        self.writer.close()
        with contextlib.suppress(OSError):  # the server closed it first
            await self.writer.wait_closed()


@dataclass(frozen=True)
class Scheduled:
    """A pre-encoded request to send ``arrival_s`` seconds after the schedule starts."""

    arrival_s: float
    request: bytes


@dataclass(frozen=True)
class Result:
    index: int  # position in the schedule
    status: int
    arrival_s: float  # as scheduled, seconds after the start
    finish_s: float  # when the answer had been read, seconds after the start
    body: bytes

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


async def open_connections(url: str, count: int) -> deque[Connection]:
    return deque(await asyncio.gather(*(Connection.connect(url) for _ in range(count))))


async def run_schedule(url: str, schedule: list[Scheduled], *, connections: int | None = None) -> list[Result]:
    """Send each request at its arrival time on a connection of its own, all concurrently; results by index.

    ``connections`` (default: one per request) are opened before the clock starts; a request that
    finds none idle opens another. Latency is answer time minus scheduled arrival.
    """
    idle = await open_connections(url, len(schedule) if connections is None else connections)
    results: list[Result | None] = [None] * len(schedule)

    async def send(index: int, item: Scheduled) -> None:
        connection = idle.popleft() if idle else await Connection.connect(url)
        answer = await connection.exchange(item.request)
        finish = time.perf_counter() - started
        results[index] = Result(index, answer.status, item.arrival_s, finish, answer.body)
        if connection.open:
            idle.append(connection)
        else:
            await connection.close()

    tasks = []
    started = time.perf_counter()
    for index, item in sorted(enumerate(schedule), key=lambda pair: pair[1].arrival_s):
        wait = started + item.arrival_s - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(send(index, item)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(c.close() for c in idle))
    return [r for r in results if r is not None]


async def sequential(url: str, request: bytes, count: int) -> tuple[list[float], list[Answer]]:
    """Send ``request`` ``count`` times one after another on one new connection: latencies (s) and answers."""
    return await sequential_each(url, [request] * count)


async def sequential_each(url: str, requests: list[bytes]) -> tuple[list[float], list[Answer]]:
    """Send ``requests`` one after another, in order, on one new connection: latencies (s) and answers."""
    connection = await Connection.connect(url)
    latencies, answers = [], []
    try:
        for request in requests:
            started = time.perf_counter()
            answer = await connection.exchange(request)
            latencies.append(time.perf_counter() - started)
            answers.append(answer)
            if not connection.open:
                await connection.close()
                connection = await Connection.connect(url)
    finally:
        await connection.close()
    return latencies, answers


async def closed_loop(
    url: str, make_request: Callable[[], bytes], on_answer: Callable[[Answer, float], None], busy_backoff_s: float = 0.2
) -> None:
    """One client on a connection of its own: send a request, wait for its answer, repeat until cancelled.

    ``on_answer(answer, latency_s)`` sees every answer; after a 503 (queue full) the client waits
    ``busy_backoff_s`` before the next request. The next request is encoded while no clock runs for this
    client (between an answer and the next send), as a user's client would.
    """
    connection = await Connection.connect(url)
    try:
        while True:
            request = make_request()
            started = time.perf_counter()
            answer = await connection.exchange(request)
            on_answer(answer, time.perf_counter() - started)
            if answer.status == 503:
                await asyncio.sleep(busy_backoff_s)
            if not connection.open:
                await connection.close()
                connection = await Connection.connect(url)
    finally:
        await connection.close()


async def loadgen_cpu_per_request(url: str, request: bytes, count: int, concurrency: int) -> float:
    """CPU seconds of this process per request: ``concurrency`` connections sending ``request`` back to back."""
    each = max(1, count // concurrency)
    started = time.process_time()
    await asyncio.gather(*(sequential(url, request, each) for _ in range(concurrency)))
    return (time.process_time() - started) / (each * concurrency)


async def httpx_cpu_per_request(url: str, path: str, body: Body, count: int, concurrency: int) -> float:
    """The same with the benchmark's httpx client (bench.client.post: the body JSON-encoded per request)."""
    each = max(1, count // concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(each):
            await post(client, path, body)

    started = time.process_time()
    async with new_client(url) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return (time.process_time() - started) / (each * concurrency)


async def client_cpu_cost(
    url: str, path: str, body: Body, *, count: int, concurrency: int, rounds: int
) -> dict[str, object]:
    """Client CPU per request (time.process_time, ms) of this load generator and of httpx on the same requests,
    ``rounds`` alternating runs of ``count`` requests each; the medians, and every round."""
    request = encode_json_post(url, path, body)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(await loadgen_cpu_per_request(url, request, count, concurrency) * 1000)
        theirs.append(await httpx_cpu_per_request(url, path, body, count, concurrency) * 1000)
    return {
        "path": path,
        "requests_per_round": count,
        "concurrency": concurrency,
        "loadgen_cpu_ms_per_request": float(np.median(ours)),
        "httpx_cpu_ms_per_request": float(np.median(theirs)),
        "rounds_ms": {"loadgen": ours, "httpx": theirs},
    }
