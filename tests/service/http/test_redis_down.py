"""The service starts and answers while its configured Redis cannot be reached."""

import io
from collections.abc import Callable

import numpy as np
from fastapi.testclient import TestClient
from payloads import encode_image

from service.http.app import create_app
from service.settings import Settings

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once


def test_service_starts_and_answers_without_its_redis(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(redis_url=UNREACHABLE))) as client:
        assert client.get("/healthz").status_code == 200
        # Every predict and certify still works: readiness holds, degraded, naming what the outage affects.
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
        assert ready.json()["checks"]["redis"] is False and "/v1/jobs" in ready.json()["degraded"][0]
        files = {"file": ("gray.png", encode_image(np.full((28, 28), 128, dtype=np.uint8)), "image/png")}
        answer = client.post("/v1/certify", files=files, data={"n0": 32, "n": 256, "seed": 0})
        assert answer.status_code == 200 and answer.json()["cached"] is False
        # Jobs live in the same Redis: refused with 503 and a clear message, never a 500 or a hang.
        buffer = io.BytesIO()
        np.savez(buffer, images=np.zeros((2, 28, 28), dtype=np.uint8))
        created = client.post("/v1/jobs", files={"file": ("x.npz", buffer.getvalue(), "application/octet-stream")})
        assert created.status_code == 503, created.text
        assert "job store" in created.json()["detail"] and "Retry-After" in created.headers
