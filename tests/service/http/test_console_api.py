"""What the web console needs from the API, through FastAPI's TestClient: the page itself, each model's
largest certifiable radius, the caller's recent jobs and a job's plot."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy.stats import norm
from tiny_model import TINY_SIGMA

from service.http.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def keyed(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_keys=["key-one", "key-two"]))) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def npz_upload(count: int, labels: bool) -> dict[str, Any]:
    rng = np.random.default_rng(count)
    images = np.clip(128 + rng.integers(-40, 41, (count, 28, 28)), 0, 255).astype(np.uint8)
    arrays = {"images": images} | ({"labels": np.zeros(count, dtype=np.int64)} if labels else {})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def start_job(client: TestClient, key: str, count: int, labels: bool = True, n: int = 64) -> str:
    created = client.post(
        "/v1/jobs", files=npz_upload(count, labels), data={"n0": "16", "n": str(n)}, headers=bearer(key)
    )
    assert created.status_code == 202, created.text
    return created.json()["id"]


def wait_done(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (status := client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json())["state"] != "done":
        assert time.monotonic() < deadline and status["state"] in ("queued", "running"), status
        time.sleep(0.05)
    return status


def test_the_console_is_served_without_a_key_and_fetches_nothing_from_elsewhere(keyed: TestClient) -> None:
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert '<meta name="viewport"' in page.text
    assets = re.findall(r'(?:src|href)="(console/[^"]+)"', page.text)
    assert sorted(assets) == ["console/console.css", "console/console.js"]
    for path, media_type in zip(sorted(assets), ["text/css", "text/javascript"], strict=True):
        asset = keyed.get(f"/{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type), path
        assert not re.search(r"https?://", asset.text), f"{path} refers to another origin"
    assert not re.search(r"https?://", page.text)
    assert keyed.get("/console/missing.js").status_code == 404
    assert "/" not in keyed.get("/openapi.json").json()["paths"]  # the page is no API route


def test_models_state_their_largest_certifiable_radius(keyed: TestClient) -> None:
    settings = keyed.app.state.settings
    (model,) = keyed.get("/v1/models", headers=bearer("key-one")).json()["models"]
    ceiling = model["max_certifiable_radius"]
    assert (ceiling["n"], ceiling["alpha"]) == (settings.default_n, settings.default_alpha)
    # All n samples agreeing gives p̲A = α^(1/n) (Clopper-Pearson with k = n), hence σ·Φ⁻¹(α^(1/n)).
    expected = TINY_SIGMA * norm.ppf(settings.default_alpha ** (1 / settings.default_n))
    assert ceiling["radius"] == pytest.approx(expected, rel=1e-9)
    small = keyed.get("/v1/models/tiny", params={"n": 1000, "alpha": 0.01}, headers=bearer("key-one")).json()
    assert small["max_certifiable_radius"] == {
        "radius": pytest.approx(TINY_SIGMA * norm.ppf(0.01 ** (1 / 1000))),
        "n": 1000,
        "alpha": 0.01,
    }
    assert small["max_certifiable_radius"]["radius"] < ceiling["radius"]
    assert keyed.get("/v1/models", params={"alpha": 0.7}, headers=bearer("key-one")).status_code == 422
    too_many = keyed.get("/v1/models", params={"n": settings.max_n + 1}, headers=bearer("key-one"))
    assert too_many.status_code == 422 and "CERTSERVE_MAX_N" in too_many.json()["detail"]


def test_recent_jobs_are_the_callers_newest_first(keyed: TestClient) -> None:
    first = start_job(keyed, "key-two", 1)
    time.sleep(0.01)  # creation times are what orders the list
    second = start_job(keyed, "key-two", 1)
    other = start_job(keyed, "key-one", 1)
    listed = keyed.get("/v1/jobs", headers=bearer("key-two")).json()["jobs"]
    assert [job["id"] for job in listed][:2] == [second, first]
    assert other not in {job["id"] for job in listed}
    assert {"state", "done", "total", "abstentions", "eta_s", "created", "model_id"} <= set(listed[0])
    assert len(keyed.get("/v1/jobs", params={"limit": 1}, headers=bearer("key-two")).json()["jobs"]) == 1
    assert keyed.get("/v1/jobs", params={"limit": 0}, headers=bearer("key-two")).status_code == 422
    assert keyed.get("/v1/jobs").status_code == 401
    for job_id in (first, second):
        wait_done(keyed, "key-two", job_id)
    wait_done(keyed, "key-one", other)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
def test_a_finished_job_has_its_plot(keyed: TestClient, labels: bool) -> None:
    job_id = start_job(keyed, "key-one", 3, labels=labels)
    assert wait_done(keyed, "key-one", job_id)["done"] == 3
    png = keyed.get(f"/v1/jobs/{job_id}/plot.png", headers=bearer("key-one"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.width >= 500 and image.height >= 400
    colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 20  # axes, text and a curve or bars: not a blank canvas
    svg = keyed.get(f"/v1/jobs/{job_id}/plot.svg", headers=bearer("key-one"))
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert "<svg" in svg.text
    assert keyed.get(f"/v1/jobs/{job_id}/plot.png", headers=bearer("key-two")).status_code == 404
    assert keyed.get(f"/v1/jobs/{job_id}/plot.gif", headers=bearer("key-one")).status_code == 422


def test_a_job_without_results_has_no_plot_yet(keyed: TestClient) -> None:
    job_id = start_job(keyed, "key-one", 2, n=500_000)  # minutes of samples: nothing finishes meanwhile
    try:
        early = keyed.get(f"/v1/jobs/{job_id}/plot.png", headers=bearer("key-one"))
        assert early.status_code == 409 and "no result to plot yet" in early.json()["detail"]
    finally:
        assert keyed.delete(f"/v1/jobs/{job_id}", headers=bearer("key-one")).json()["cancelled"] is True
