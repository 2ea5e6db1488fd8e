"""A certificate answered from the cache is answered by the route alone: no work reaches the scheduler.

(The in-process cache once measured ~20 ms a hit against Redis's ~2; the cause was the benchmark's
client, see bench/findings.md and tests/bench/test_loadgen.py. This guards the server's side.)
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.engine.scheduler import WorkItem
from service.http.app import create_app
from service.settings import Settings


def gray_png_base64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_cache_hit_submits_no_work(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(make_settings())) as client:  # no Redis: the in-process LRU
        scheduler = client.app.state.services.scheduler
        body = {"image_base64": gray_png_base64(), "n0": 32, "n": 128}
        first = client.post("/v1/certify", json=body).json()
        submitted: list[WorkItem] = []
        submit = scheduler.submit
        monkeypatch.setattr(scheduler, "submit", lambda item: submitted.append(item) or submit(item))

        again = client.post("/v1/certify", json=body).json()
        assert first["cached"] is False and again["cached"] is True
        assert submitted == []  # the hit queued nothing: no scheduler, no executor, no batch to wait for

        miss = client.post("/v1/certify", json={**body, "n": 160}).json()  # the spy sees work when there is some
        assert miss["cached"] is False and sum(item.num for item in submitted) == 32 + 160
