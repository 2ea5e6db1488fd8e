"""End to end: the real server (``python -m service`` under uvicorn, in a subprocess) with the real Redis.

Concurrent predict and certify requests over HTTP are checked against the library computing the
same thing with the same seed, on the same checkpoint prepared the same way (BatchNorm folded,
the tuned memory format). As in test_api, counts may differ by a sample or two where a
different batch composition rounds a near-tie the other way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from live_server import running_server
from payloads import encode_image
from tiny_model import TINY_CLASSES, TINY_ID, TINY_SIGMA

from models.registry import load_model
from smoothing.core import certify, predict
from smoothing.tuning import InferencePlan, prepare_for_inference

pytestmark = pytest.mark.slow  # starting a server process takes several seconds

REDIS_URL = "redis://127.0.0.1:6379/15"
ALPHA = 0.001
FLIPS_ALLOWED = 2


@pytest.fixture(scope="module")
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def server(
    tiny_registry: Path, tuning_cache: Path, redis_db: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The base URL of a running server; on teardown it must shut down cleanly on SIGTERM."""
    env = {
        "CERTSERVE_MODEL_DIR": str(tiny_registry),
        "CERTSERVE_TUNING_CACHE": str(tuning_cache),
        "CERTSERVE_REDIS_URL": REDIS_URL,
        "CERTSERVE_DEVICES": "cpu",
        "CERTSERVE_PRECISION": "float32",
        "CERTSERVE_BATCH_DELAY_MS": "5",
    }
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def plan(tiny_registry: Path, tuning_cache: Path) -> InferencePlan:
    """The tiny model prepared as the server prepares it (same tuning answer, so the same memory format)."""
    model, manifest = load_model(tiny_registry, TINY_ID)
    return prepare_for_inference(model, manifest.input_shape, "cpu", cache_key=manifest.sha256, cache_file=tuning_cache)


def pixels_of(i: int) -> np.ndarray:
    """Mid-gray images with a little speckle: mixed counts under noise."""
    rng = np.random.default_rng(i)
    return np.clip(128 + rng.integers(-40, 41, (28, 28)), 0, 255).astype(np.uint8)


def tensor_of(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).to(torch.float32).div(255.0).unsqueeze(0)


def assert_counts_agree(service: list[int], library: tuple[int, ...]) -> None:
    assert sum(service) == sum(library)
    moved = sum(abs(a - b) for a, b in zip(service, library, strict=True)) // 2
    assert moved <= FLIPS_ALLOWED, f"service {service} vs library {list(library)}"


def post(base: str, endpoint: str, pixels: np.ndarray, fields: dict[str, int]) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/v1/{endpoint}",
        files={"file": ("x.png", encode_image(pixels), "image/png")},
        data={k: str(v) for k, v in fields.items()},
        timeout=60.0,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_answers_match_the_library(server: str, plan: InferencePlan) -> None:
    requests = [("predict", i, {"n": 300, "seed": 100 + i}) for i in range(4)]
    requests += [("certify", i, {"n0": 64, "n": 400, "seed": 200 + i}) for i in range(4)]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: post(server, r[0], pixels_of(r[1]), r[2]), requests))
    common = dict(
        sigma=TINY_SIGMA,
        num_classes=len(TINY_CLASSES),
        alpha=ALPHA,
        batch_size=plan.batch_size,
        channels_last=plan.channels_last,
    )
    for (endpoint, i, fields), answer in zip(requests, answers, strict=True):
        x = tensor_of(pixels_of(i))
        assert answer["seed"] == fields["seed"] and answer["model"] == TINY_ID and answer["cached"] is False
        if endpoint == "predict":
            expected = predict(plan.model, x, n=fields["n"], seed=fields["seed"], **common)
            assert_counts_agree(answer["counts"], expected.counts)
        else:
            expected = certify(plan.model, x, n0=fields["n0"], n=fields["n"], seed=fields["seed"], **common)
            assert_counts_agree(answer["selection_counts"], expected.selection_counts)
            assert_counts_agree(answer["estimation_counts"], expected.estimation_counts)
            if tuple(answer["estimation_counts"]) == expected.estimation_counts:
                assert answer["radius"] == expected.radius and answer["label"] == expected.label


def test_certificate_cache_lives_in_redis(server: str, redis_db: redis.Redis) -> None:
    pixels = pixels_of(42)
    seeded = post(server, "certify", pixels, {"n0": 32, "n": 128, "seed": 1})
    assert seeded["cached"] is False and not any(redis_db.scan_iter())  # a client's seed is never cached
    first = post(server, "certify", pixels, {"n0": 32, "n": 128})
    assert first["cached"] is False and first["seed_source"] == "server"
    assert any(key.startswith(b"certserve:cert:") for key in redis_db.scan_iter())
    again = post(server, "certify", pixels, {"n0": 32, "n": 128})
    assert again["cached"] is True and again["seed"] == first["seed"]
    assert again["estimation_counts"] == first["estimation_counts"] and again["radius"] == first["radius"]
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["checks"]["redis"] is True


def pending_samples(server: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith("certserve_pending_samples "):
            return float(line.split()[1])
    raise AssertionError("no certserve_pending_samples in /metrics")


def test_a_client_that_disconnects_cancels_its_work(server: str) -> None:
    pixels = pixels_of(7)
    with pytest.raises(httpx.ReadTimeout):  # we hang up after a second; 10^6 samples take minutes here
        httpx.post(
            f"{server}/v1/certify",
            files={"file": ("x.png", encode_image(pixels), "image/png")},
            data={"n0": "100", "n": "1000000"},
            timeout=httpx.Timeout(5.0, read=1.0),
        )
    deadline = time.monotonic() + 5
    while (left := pending_samples(server)) > 0:
        assert time.monotonic() < deadline, f"{left:.0f} samples still pending after the client left"
        time.sleep(0.1)


def test_adaptive_modes_through_the_real_server(server: str) -> None:
    pixels = pixels_of(7)
    decision = post(server, "certify", pixels, {"mode": "adaptive", "radius": 0.01, "n": 20_000, "seed": 1})
    assert decision["mode"] == "adaptive" and decision["certified_at_radius"] is True
    assert decision["samples"] < 100 + 20_000 and decision["samples"] == decision["n0"] + decision["n"]
    adaptive = post(server, "certify", pixels, {"mode": "adaptive", "n": 5_000, "seed": 2})
    assert adaptive["mode"] == "adaptive" and adaptive["target_radius"] is None and adaptive["n_max"] == 5_000
