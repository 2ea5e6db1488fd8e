"""/v1/certify's sample-efficient modes: adaptive certificates and "certified at radius r?" decisions.

The answers are checked against the library procedures driven with the same seed (the same
noise samples), and the cache must tell the modes and radii apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from payloads import encode_image
from prometheus_client import REGISTRY
from tiny_model import TINY_CLASSES, TINY_ID, TINY_SIGMA

from service.http.app import create_app
from service.settings import Settings
from smoothing.sequential import DEFAULT_DECISION_N0, adaptive_certify, model_sampler, radius_test, run

ALPHA = 0.01
GRAY = np.full((28, 28), 128, dtype=np.uint8)  # the tiny model gives class 0 to ≈ 80 % of noisy copies


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def certify(client: TestClient, **fields: object) -> dict:
    files = {"file": ("gray.png", encode_image(GRAY), "image/png")}
    response = client.post("/v1/certify", files=files, data={"alpha": ALPHA, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def library_sampler(client: TestClient, seed: int) -> Callable:
    plan = client.app.state.services.engine.model(TINY_ID).plan
    x = torch.from_numpy(GRAY).float().div(255).unsqueeze(0)
    return model_sampler(
        plan.model,
        x,
        sigma=TINY_SIGMA,
        num_classes=len(TINY_CLASSES),
        batch_size=plan.batch_size,
        seed=seed,
        channels_last=plan.channels_last,
    )


def samples_metric(mode: str) -> float:
    return REGISTRY.get_sample_value("certserve_certification_samples_count", {"mode": mode}) or 0.0


def test_adaptive_certificate_matches_the_library_and_stops_early(client: TestClient) -> None:
    before = samples_metric("adaptive")
    answer = certify(client, mode="adaptive", n=20_000, tolerance=0.05, seed=3)
    library = run(
        adaptive_certify(sigma=TINY_SIGMA, alpha=ALPHA, n0=100, n_max=20_000, tolerance=0.05),
        library_sampler(client, 3),
    )
    assert answer["mode"] == "adaptive" and answer["label"] == library.label == 0
    assert answer["samples"] == library.samples < 100 + 20_000
    assert answer["n"] == sum(answer["estimation_counts"]) == library.samples - 100
    assert answer["radius"] == pytest.approx(library.radius)
    assert answer["n_max"] == 20_000 and answer["certified_at_radius"] is None
    assert samples_metric("adaptive") == before + 1


def test_radius_decision_certifies_small_radii_quickly_and_refuses_large_ones(client: TestClient) -> None:
    small = certify(client, mode="adaptive", radius=0.05, n=20_000, seed=4)
    library = run(
        radius_test(radius=0.05, sigma=TINY_SIGMA, alpha=ALPHA, n0=DEFAULT_DECISION_N0, n_max=20_000),
        library_sampler(client, 4),
    )
    assert small["n0"] == DEFAULT_DECISION_N0  # the radius decision's own default selection size
    assert small["certified_at_radius"] is library.certified is True
    assert small["samples"] == library.samples < 2_000
    assert small["label"] == 0 and small["radius"] >= 0.05 and small["target_radius"] == 0.05

    # Beyond what 20,000 samples could ever certify: answered at once, without sampling.
    huge = certify(client, mode="adaptive", radius=5.0, n=20_000, seed=4)
    assert huge["certified_at_radius"] is False and huge["samples"] == 0
    assert 0 < huge["max_certifiable_radius"] < 5.0


def test_fixed_mode_answers_the_radius_question_from_the_paper_certificate(client: TestClient) -> None:
    answer = certify(client, radius=0.05, n0=64, n=2_000, seed=5)
    assert answer["mode"] == "fixed" and answer["samples"] == 2_064 and answer["n_max"] == 2_000
    assert answer["certified_at_radius"] is (answer["label"] is not None and answer["radius"] >= 0.05)


def test_cache_key_tells_modes_radii_and_tolerances_apart(client: TestClient) -> None:
    first = certify(client, mode="adaptive", radius=0.1, n=5_000)
    assert not first["cached"] and first["seed_source"] == "server"
    again = certify(client, mode="adaptive", radius=0.1, n=5_000)
    assert again["cached"] and again["seed"] == first["seed"] and again["samples"] == first["samples"]
    assert not certify(client, mode="adaptive", radius=0.2, n=5_000)["cached"]
    assert not certify(client, mode="adaptive", n=5_000)["cached"]
    assert not certify(client, mode="adaptive", n=5_000, tolerance=0.1)["cached"]
    fixed = certify(client, mode="fixed", radius=0.1, n=5_000)
    assert not fixed["cached"]
    # A fixed-mode target changes neither the samples nor the certificate: another target is a hit,
    # with its verdict computed from the stored certificate.
    other = certify(client, mode="fixed", radius=0.3, n=5_000)
    assert other["cached"] and other["seed"] == fixed["seed"] and other["target_radius"] == 0.3
    assert other["certified_at_radius"] == (not other["abstained"] and other["radius"] >= 0.3)


def test_bad_mode_parameters_are_422(client: TestClient) -> None:
    files = {"file": ("gray.png", encode_image(GRAY), "image/png")}
    for data in ({"mode": "greedy"}, {"radius": -1}, {"tolerance": 0}, {"radius": "nan"}):
        response = client.post("/v1/certify", files=files, data=data)
        assert response.status_code == 422, (data, response.text)
