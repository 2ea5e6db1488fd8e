"""Jobs through the real app while its own Redis is killed and restarted, with and without persistence.

Each test runs a redis-server of its own (ports 6390-6399) and SIGKILLs it mid-job: with AOF on,
the job must finish with exactly one result per image and keep its inputs until it is done;
without persistence the job is gone, and the service must stop it cleanly (no orphan keys, the
jobs gauge back at 0).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis_server import RedisServer

from service.http.app import create_app
from service.settings import Settings

IMAGES = 24  # three waves of the runner's 8 images in flight: results land while the job runs
PARAMS = {"n0": 32, "n": 512, "seed": 7}
OUTAGE_S = 3.0


def job_upload(count: int = IMAGES) -> dict:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, images=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), labels=np.arange(count) % 10)
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def poll(client: TestClient, url: str, until: Callable[[dict], bool], timeout: float = 120.0) -> dict:
    """The job's status once ``until`` holds; 503s (the store is down) are waited out."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(url)
        if answer.status_code == 200 and until(answer.json()):
            return answer.json()
        assert answer.status_code in (200, 503), answer.text
        assert time.monotonic() < deadline, f"timed out; last answer {answer.status_code} {answer.text}"
        time.sleep(0.05)


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    port, persistent = request.param
    server = RedisServer(port, tmp_path / "redis", persistent=persistent)
    server.start()
    yield server
    server.kill()


@pytest.mark.parametrize("redis_server", [(6391, True)], indirect=True)
def test_a_job_survives_a_redis_crash_and_restart_with_aof(
    redis_server: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    with TestClient(create_app(make_settings(redis_url=redis_server.url))) as client:
        created = client.post("/v1/jobs", files=job_upload(), data=PARAMS)
        assert created.status_code == 202, created.text
        url = created.headers["Location"]
        before = poll(client, url, lambda s: s["done"] >= 2)
        assert before["state"] == "running" and before["done"] < IMAGES, before
        redis_server.kill()
        time.sleep(OUTAGE_S)
        redis_server.start()
        final = poll(client, url, lambda s: s["state"] not in ("queued", "running"))
        assert final["state"] == "done" and final["error"] is None, final
        assert final["done"] == IMAGES
        rows = client.get(f"{url}/results").json()["results"]
        assert [r["idx"] for r in rows] == list(range(IMAGES))  # one result per image, none twice or missing
        # The same job run without an outage gives the same rows (images are seeded per index).
        again = client.post("/v1/jobs", files=job_upload(), data=PARAMS).headers["Location"]
        poll(client, again, lambda s: s["state"] == "done")
        clean = client.get(f"{again}/results").json()["results"]
        assert [(r["predict"], r["count_a"]) for r in rows] == [(r["predict"], r["count_a"]) for r in clean]


@pytest.mark.parametrize("redis_server", [(6392, False)], indirect=True)
def test_a_redis_restart_without_persistence_stops_its_jobs_cleanly(
    redis_server: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    with TestClient(create_app(make_settings(redis_url=redis_server.url))) as client:
        created = client.post("/v1/jobs", files=job_upload(), data=PARAMS)
        url = created.headers["Location"]
        poll(client, url, lambda s: s["done"] >= 2)
        redis_server.kill()
        time.sleep(OUTAGE_S)
        redis_server.start()  # empty: the job, its inputs and its results are gone
        deadline = time.monotonic() + 30
        while client.get(url).status_code != 404 or client.app.state.services.jobs.running():
            assert time.monotonic() < deadline, "the runner kept working on a job that no longer exists"
            time.sleep(0.05)
        time.sleep(1.0)  # would-be late writers of in-flight images
        assert redis_server.client().keys("certserve:job:*") == []  # no orphan results or counters
        assert REGISTRY.get_sample_value("certserve_jobs", {"state": "running"}) == 0
