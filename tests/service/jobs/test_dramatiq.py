"""Batch jobs on Dramatiq workers (CERTSERVE_JOB_BACKEND=dramatiq) with the real Redis.

The fast tests run a worker inside the test process (its own pool, loop and Dramatiq threads)
beside an API app; the slow one runs the API and two worker processes as a user deploys them,
SIGKILLs a worker and restarts the API mid-job. Every job's results are compared with a run of
the same job (same seed) on the in-process backend.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.jobs.queue import NAMESPACE, QUEUE, message_ranges
from service.jobs.worker import Worker, certify_range
from service.settings import Settings

FAST_DB, SLOW_DB = 4, 5
REPO = Path(__file__).resolve().parents[3]
JOB_SEED = 1717
COUNTS_ALLOWED = 2  # argmax flips between batch compositions (last-bit float rounding), as in the API tests


def redis_url(db: int) -> str:
    return f"redis://127.0.0.1:6379/{db}"


@pytest.fixture
def fast_db() -> Iterator[str]:
    client = redis.Redis.from_url(redis_url(FAST_DB))
    client.flushdb()
    yield redis_url(FAST_DB)
    client.flushdb()
    client.close()


def npz_upload(count: int, seed: int = 0) -> dict[str, Any]:
    images = np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    images[::3] = 128  # mid-gray: certified; the random ones mostly abstain
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=np.arange(count) % 10)
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


JOB_FIELDS = {"n0": "32", "n": "256", "seed": str(JOB_SEED)}


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def in_process_rows(make_settings: Callable[..., Settings], count: int, fields: dict[str, str]) -> list[dict]:
    """The same job on the in-process backend (SQLite): the reference."""
    with TestClient(create_app(make_settings())) as client:
        job = client.post("/v1/jobs", files=npz_upload(count), data=fields).json()
        wait_for(lambda: client.get(job["status_url"]).json()["state"] == "done", 120, "the in-process job")
        return client.get(f"{job['status_url']}/results", params={"format": "json"}).json()["results"]


def assert_same_results(got: list[dict], expected: list[dict]) -> None:
    assert [r["idx"] for r in got] == [r["idx"] for r in expected] == list(range(len(expected)))
    for a, b in zip(got, expected, strict=True):
        assert a["predict"] == b["predict"] and a["name"] == b["name"], (a, b)
        assert abs(a["count_a"] - b["count_a"]) <= COUNTS_ALLOWED, (a, b)
        if a["count_a"] == b["count_a"]:
            assert a["radius"] == b["radius"]


def test_a_job_becomes_messages_of_image_ranges() -> None:
    assert message_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert message_ranges(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="CERTSERVE_REDIS_URL"):
        Settings(job_backend="dramatiq", redis_url=None)


def test_dramatiq_jobs_answer_as_the_in_process_backend_and_redelivery_changes_nothing(
    make_settings: Callable[..., Settings], fast_db: str
) -> None:
    count = 10
    settings = make_settings(
        job_backend="dramatiq", redis_url=fast_db, job_message_images=4, worker_threads=2, threads=1
    )
    with TestClient(create_app(settings)) as api:
        job = api.post("/v1/jobs", files=npz_upload(count), data=JOB_FIELDS).json()
        broker = redis.Redis.from_url(fast_db)
        assert broker.llen(f"{NAMESPACE}:{QUEUE}") == 3  # [0, 4), [4, 8), [8, 10): nothing ran in the API
        assert api.get(job["status_url"]).json()["state"] == "queued"
        worker = Worker(settings)
        worker.start()
        try:
            wait_for(lambda: api.get(job["status_url"]).json()["state"] == "done", 120, "the workers")
            rows = api.get(f"{job['status_url']}/results", params={"format": "json"}).json()["results"]
            # A redelivered message (the same range again) computes nothing and changes no row or counter.
            summary = asyncio.run_coroutine_threadsafe(worker.store.summary(job["id"]), worker.loop).result()
            again = worker._wait(certify_range(worker.store, worker.engine, worker.inputs, job["id"], 0, 4))
            assert again == 0
            assert asyncio.run_coroutine_threadsafe(worker.store.summary(job["id"]), worker.loop).result() == summary
        finally:
            worker.stop()
        assert api.get(f"{job['status_url']}/results", params={"format": "json"}).json()["results"] == rows
    assert summary.done == count
    assert_same_results(rows, in_process_rows(make_settings, count, JOB_FIELDS))


# -- many processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=out, stderr=out)


def up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_a_killed_worker_and_a_restarted_api_lose_nothing(
    make_settings: Callable[..., Settings], tiny_registry: Path, tuning_cache: Path, tmp_path: Path
) -> None:
    count = 48
    client = redis.Redis.from_url(redis_url(SLOW_DB))
    client.flushdb()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}
    env = {
        **base_env,
        "CERTSERVE_MODEL_DIR": str(tiny_registry),
        "CERTSERVE_MODELS": '["tiny"]',
        "CERTSERVE_TUNING_CACHE": str(tuning_cache),
        "CERTSERVE_PRECISION": "float32",
        "CERTSERVE_DEVICES": "cpu",
        "CERTSERVE_THREADS": "1",
        "CERTSERVE_REDIS_URL": redis_url(SLOW_DB),
        "CERTSERVE_JOB_BACKEND": "dramatiq",
        "CERTSERVE_JOB_MESSAGE_IMAGES": "4",
        "CERTSERVE_WORKER_THREADS": "1",
        # Tests only: a killed worker's messages come back within seconds (production keeps Dramatiq's 60 s).
        "CERTSERVE_WORKER_HEARTBEAT_TIMEOUT_MS": "3000",
        "CERTSERVE_WORKER_MAINTENANCE_CHANCE": "1000000",
        "CERTSERVE_SHUTDOWN_GRACE_S": "5",
    }
    api_port = free_port()
    api_env = {**env, "CERTSERVE_PORT": str(api_port)}
    base = f"http://127.0.0.1:{api_port}"
    processes: list[subprocess.Popen] = []
    try:
        api = start("service", api_env, tmp_path / "api.log")
        processes.append(api)
        workers = []
        for k in range(2):
            port = free_port()
            worker = start(
                "service.jobs.worker", {**env, "CERTSERVE_WORKER_METRICS_PORT": str(port)}, tmp_path / f"w{k}.log"
            )
            processes.append(worker)
            workers.append((worker, port))
        wait_for(lambda: up(f"{base}/readyz"), 90, "the API")
        for _, port in workers:
            wait_for(lambda port=port: up(f"http://127.0.0.1:{port}/metrics"), 90, "a worker")
        fields = {**JOB_FIELDS, "n": "2048"}
        job = httpx.post(f"{base}/v1/jobs", files=npz_upload(count), data=fields, timeout=30).json()
        status = lambda: httpx.get(f"{base}{job['status_url']}", timeout=5).json()  # noqa: E731
        wait_for(lambda: status()["done"] >= 8, 120, "the first images")
        workers[0][0].send_signal(signal.SIGKILL)  # mid-message: its unacked messages must come back
        api.send_signal(signal.SIGKILL)  # and the API goes too: the job lives in Redis, not in it
        api.wait(10)
        assert stored_results(client, job["id"]) < count  # killed mid-job
        api = start("service", api_env, tmp_path / "api.log")
        processes.append(api)
        wait_for(lambda: up(f"{base}/readyz"), 90, "the restarted API")
        wait_for(lambda: status()["state"] == "done", 240, "the job to finish on the surviving worker")
        rows = httpx.get(f"{base}{job['status_url']}/results", params={"format": "json"}, timeout=10).json()["results"]
        assert status()["done"] == count
        metrics = httpx.get(f"http://127.0.0.1:{workers[1][1]}/metrics", timeout=5).text
        assert "certserve_worker_images_total" in metrics and "certserve_forward_passes_total" in metrics
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        client.flushdb()
        client.close()
    assert len(rows) == count  # exactly one result per image
    assert_same_results(rows, in_process_rows(make_settings, count, fields))


def stored_results(client: redis.Redis, job_id: str) -> int:
    return int(client.hget(f"certserve:job:{job_id}", "done") or 0)
