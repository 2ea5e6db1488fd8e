"""bench.loadgen against a tiny real server (uvicorn on a free port, in a thread of this process).

The server's answers name the client port they came in on, so connection reuse is seen from the
server's side: keep-alive means one port for many requests, one connection per request in flight
means as many ports as requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.cache import WARMUP_HITS, repeated_certify
from bench.loadgen import (
    Answer,
    Connection,
    Scheduled,
    closed_loop,
    encode_json_post,
    encode_request,
    run_schedule,
    sequential,
    sequential_each,
)
from bench.server import free_port
from models.checkpoint import Manifest


class InFlight:
    """Requests the server is answering now, the most at once, and the client port of each /v1/certify."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.certify_ports: list[int] = []


def tiny_app(in_flight: InFlight) -> Starlette:
    certified: set[bytes] = set()

    async def status(request: Request) -> JSONResponse:
        """The status in the path, after ``wait_s`` (query) seconds; the body's length and the client port."""
        body = await request.body()
        in_flight.now += 1
        in_flight.most = max(in_flight.most, in_flight.now)
        try:
            await asyncio.sleep(float(request.query_params.get("wait_s", 0)))
        finally:
            in_flight.now -= 1
        headers = {"Connection": "close"} if request.query_params.get("close") else None
        answer = {"port": request.client.port, "body_bytes": len(body), "path": request.url.path}
        return JSONResponse(answer, status_code=int(request.path_params["code"]), headers=headers)

    async def certify(request: Request) -> JSONResponse:
        """A stand-in cache: the first request for a body is a miss, every later one a hit."""
        body = await request.body()
        cached = body in certified
        certified.add(body)
        in_flight.certify_ports.append(request.client.port)
        return JSONResponse({"cached": cached, "port": request.client.port})

    return Starlette(
        routes=[
            Route("/status/{code:int}", status, methods=["GET", "POST"]),
            Route("/v1/certify", certify, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, InFlight]]:
    in_flight = InFlight()
    port = free_port()
    config = uvicorn.Config(tiny_app(in_flight), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "the tiny server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", in_flight
    instance.should_exit = True
    thread.join(5)


def port_of(body: bytes) -> int:
    return json.loads(body)["port"]


def test_schedule_records_statuses_and_latencies(server: tuple[str, InFlight]) -> None:
    url, _ = server
    codes = [200, 404, 503, 200, 422]
    schedule = [
        Scheduled(0.02 * i, encode_json_post(url, f"/status/{code}", {"i": i, "pad": "x" * 100}))
        for i, code in enumerate(codes)
    ]
    results = asyncio.run(run_schedule(url, schedule))
    assert [r.index for r in results] == list(range(len(codes)))
    assert [r.status for r in results] == codes
    for i, r in enumerate(results):
        assert r.arrival_s == pytest.approx(0.02 * i)
        assert r.finish_s > r.arrival_s and r.latency_s == r.finish_s - r.arrival_s
        answer = json.loads(r.body)  # the whole body was read: Content-Length honoured
        assert answer["body_bytes"] == len(json.dumps({"i": i, "pad": "x" * 100}, separators=(",", ":")))


def test_one_connection_per_request_in_flight(server: tuple[str, InFlight]) -> None:
    url, in_flight = server
    in_flight.most = 0
    schedule = [Scheduled(0.0, encode_request("GET", url, "/status/200?wait_s=0.3")) for _ in range(6)]
    results = asyncio.run(run_schedule(url, schedule))
    assert all(r.status == 200 for r in results)
    assert len({port_of(r.body) for r in results}) == 6  # six connections, none waiting for another's answer
    assert in_flight.most == 6


def test_a_connection_is_reused_once_its_answer_is_back(server: tuple[str, InFlight]) -> None:
    url, _ = server
    schedule = [Scheduled(0.05 * i, encode_request("GET", url, "/status/200")) for i in range(5)]
    results = asyncio.run(run_schedule(url, schedule, connections=1))
    assert len({port_of(r.body) for r in results}) == 1


def test_keep_alive_and_a_server_that_closes(server: tuple[str, InFlight]) -> None:
    url, _ = server
    latencies, answers = asyncio.run(sequential(url, encode_request("GET", url, "/status/200"), 5))
    assert len(latencies) == 5 and all(s > 0 for s in latencies)
    assert len({port_of(a.body) for a in answers}) == 1 and all(a.keep_alive for a in answers)
    _, answers = asyncio.run(sequential(url, encode_request("GET", url, "/status/200?close=1"), 3))
    assert [a.status for a in answers] == [200] * 3 and not any(a.keep_alive for a in answers)
    assert len({port_of(a.body) for a in answers}) == 3  # a new connection after each Connection: close


def test_pipelined_requests_are_answered_in_order(server: tuple[str, InFlight]) -> None:
    url, _ = server

    async def pipelined() -> list:
        connection = await Connection.connect(url)
        try:
            # The first is the slowest: HTTP/1.1 still answers in request order.
            paths = ["/status/201?wait_s=0.1", "/status/202", "/status/203"]
            return await connection.pipeline([encode_request("GET", url, p) for p in paths])
        finally:
            await connection.close()

    answers = asyncio.run(pipelined())
    assert [a.status for a in answers] == [201, 202, 203]
    assert [json.loads(a.body)["path"] for a in answers] == ["/status/201", "/status/202", "/status/203"]
    assert len({port_of(a.body) for a in answers}) == 1


def test_cache_repeats_go_out_on_one_connection_of_their_own(server: tuple[str, InFlight]) -> None:
    """The cause of the slow in-process cache figure: the repeats went out on the httpx client that had just
    served the mixed load, whose pool held hundreds of connections. They now go out on one connection of their
    own, whatever ran before."""
    url, in_flight = server
    busy = [Scheduled(0.0, encode_request("GET", url, "/status/200")) for _ in range(50)]
    before = {port_of(r.body) for r in asyncio.run(run_schedule(url, busy))}
    manifest = Manifest(
        id="m",
        architecture="a",
        dataset="d",
        classes=["0", "1"],
        input_shape=(1, 4, 4),
        sigma=0.25,
        normalization={"mean": [0.5], "std": [0.5]},
        sha256="0" * 64,
    )
    in_flight.certify_ports.clear()
    result = asyncio.run(repeated_certify(url, manifest, hits=10, n0=10, n=100, alpha=0.001, seed=0))
    assert result["first_request_cached"] is False and result["repeats_not_cached"] == 0
    assert result["repeats"]["count"] == 10
    first, *repeats = in_flight.certify_ports
    assert len(repeats) == WARMUP_HITS + 10 and len(set(repeats)) == 1  # every repeat on one connection
    assert not ({first, *repeats} & before)  # none of them left over from the load before


def test_sequential_each_sends_its_requests_in_order_on_one_connection(server: tuple[str, InFlight]) -> None:
    url, _ = server
    codes = [201, 202, 203, 200]
    latencies, answers = asyncio.run(sequential_each(url, [encode_request("GET", url, f"/status/{c}") for c in codes]))
    assert [a.status for a in answers] == codes and len(latencies) == 4
    assert len({port_of(a.body) for a in answers}) == 1


def test_closed_loop_keeps_one_request_in_flight_and_backs_off_after_503(server: tuple[str, InFlight]) -> None:
    url, in_flight = server
    seen: list[tuple[int, int]] = []  # (status, client port)

    def record(answer: Answer, latency: float) -> None:
        assert latency > 0
        seen.append((answer.status, port_of(answer.body)))

    async def run(path: str, seconds: float) -> None:
        task = asyncio.create_task(closed_loop(url, lambda: encode_request("GET", url, path), record, 0.2))
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    in_flight.most = 0
    asyncio.run(run("/status/200?wait_s=0.02", 0.5))
    assert len(seen) >= 5 and {s for s, _ in seen} == {200}
    assert len({p for _, p in seen}) == 1 and in_flight.most == 1  # one connection, one request at a time
    seen.clear()
    asyncio.run(run("/status/503", 0.5))
    assert 1 <= len(seen) <= 4  # each 503 waits 0.2 s: no hot loop against a full queue
