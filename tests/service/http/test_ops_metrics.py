"""What the ops team reads from /metrics: responses by cause, job backlog, Redis reachability, GPU absence on CPU."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from payloads import encode_image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import TINY_ID

from service.gpu_metrics import GPU
from service.http.app import create_app
from service.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/8"
UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once


def responses(route: str, code: int, cause: str) -> float:
    labels = {"route": route, "code": str(code), "cause": cause}
    return REGISTRY.get_sample_value("certserve_http_responses_total", labels) or 0.0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def png() -> dict:
    return {"file": ("x.png", encode_image(np.full((28, 28), 128, dtype=np.uint8)), "image/png")}


def npz(count: int) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8))
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_every_response_is_counted_with_its_route_and_cause(make_settings: Callable[..., Settings]) -> None:
    app: FastAPI = create_app(make_settings(max_body_bytes=10_000, max_pending_samples=5_000))

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        cases = [
            (lambda: client.post("/v1/predict", files=png(), data={"n": "16"}), "/v1/predict", 200, "ok"),
            (lambda: client.post("/v1/predict", files=png(), data={"n": "-1"}), "/v1/predict", 422, "client_error"),
            (lambda: client.get("/v1/jobs/no-such-job"), "/v1/jobs/{job_id}", 404, "client_error"),
            (lambda: client.get("/no/such/path"), "unmatched", 404, "client_error"),
            # Refused by the body limit before routing: still counted under the route it was sent to.
            (lambda: client.post("/v1/certify", content=b"x" * 20_000), "/v1/certify", 413, "client_error"),
            (
                lambda: client.post("/v1/certify", files=png(), data={"n0": "32", "n": "9000"}),
                "/v1/certify",
                503,
                "queue_full",
            ),
            (lambda: client.get("/test-only/boom"), "/test-only/boom", 500, "server_error"),
        ]
        for call, route, code, cause in cases:
            before = responses(route, code, cause)
            assert call().status_code == code
            assert responses(route, code, cause) == before + 1, (route, code, cause)


def test_a_deadline_is_counted_as_one(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(request_timeout_s=0.05))) as client:
        before = responses("/v1/certify", 504, "deadline")
        assert client.post("/v1/certify", files=png(), data={"n0": "32", "n": "200000"}).status_code == 504
        assert responses("/v1/certify", 504, "deadline") == before + 1


def test_job_backlog_and_redis_reachability_are_read_at_each_scrape(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    with TestClient(create_app(make_settings(redis_url=REDIS_URL))) as client:
        created = client.post("/v1/jobs", files=npz(3), data={"n0": "16", "n": "64"})
        assert created.status_code == 202, created.text
        page = samples(client.get("/metrics").text)
        assert page[("certserve_redis_up", (("role", "jobs"),))] == 1.0
        assert page[("certserve_redis_up", (("role", "cache"),))] == 1.0
        assert 0 <= page[("certserve_job_backlog_images", (("backend", "inprocess"),))] <= 3
        job = f"/v1/jobs/{created.json()['id']}"
        deadline = time.monotonic() + 30
        while client.get(job).json()["state"] != "done":
            assert time.monotonic() < deadline, client.get(job).json()
            time.sleep(0.05)
        page = samples(client.get("/metrics").text)
        assert page[("certserve_job_backlog_images", (("backend", "inprocess"),))] == 0
        assert page[("certserve_jobs", (("state", "done"),))] == 1


def test_an_unreachable_redis_reads_zero_and_the_scrape_still_answers(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(redis_url=UNREACHABLE))) as client:
        started = time.perf_counter()
        response = client.get("/metrics")
        assert response.status_code == 200 and time.perf_counter() - started < 2.0
        page = samples(response.text)
        assert page[("certserve_redis_up", (("role", "jobs"),))] == 0.0
        assert page[("certserve_redis_up", (("role", "cache"),))] == 0.0


def test_the_cache_can_live_in_a_redis_of_its_own(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    """CERTSERVE_CACHE_REDIS_URL alone: certificates in that Redis, jobs still in SQLite."""
    with TestClient(create_app(make_settings(cache_redis_url=REDIS_URL))) as client:
        assert client.post("/v1/certify", files=png(), data={"n0": "16", "n": "64"}).status_code == 200
        keys = [k.decode() for k in redis_db.scan_iter()]
        assert keys and all(k.startswith("certserve:cert:") for k in keys)
        assert client.post("/v1/jobs", files=npz(1), data={"n0": "16", "n": "32"}).status_code == 202
        assert not any(k.startswith(b"certserve:job:") for k in redis_db.scan_iter())
        assert client.get("/readyz").json()["checks"]["redis"] is True


def test_no_gpu_series_on_a_cpu_service(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as client:
        text = client.get("/metrics").text
        assert "certserve_gpu_" not in text
        assert GPU.devices == []
        page = samples(text)
        assert page[("certserve_measured_limit_samples_per_second", (("executor", "cpu"), ("model", TINY_ID)))] > 0
        failures = ("certserve_forward_pass_failures_total", (("executor", "cpu"), ("model", TINY_ID)))
        assert page[failures] == 0.0  # exported at 0 from the start, so that rate() sees the first one
    # Asked to watch a CUDA device on a host without CUDA, the collector still reports nothing.
    if not torch.cuda.is_available():
        GPU.watch([torch.device("cuda", 0)])
        assert GPU.devices == [] and list(GPU.collect()) == []
