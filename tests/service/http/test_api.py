"""The HTTP API through FastAPI's TestClient, which runs the app's lifespan (models, executor, cache, jobs).

Answers are checked against the library (``smoothing.core``) run with the same seed on the
service's own inference module: the noise blocks are seeded per (seed, stage, block), so both
see the same samples. The counts may still differ by a sample or two: the service classifies
a sample in a batch shared with other requests, and a convolution over a batch of another
composition may round differently in the last float bit, which can flip an argmax on a
near-tie. ``assert_counts_agree`` allows that much and no more.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from payloads import bomb_png, encode_image
from prometheus_client import REGISTRY
from tiny_model import TINY_BATCH, TINY_CLASSES, TINY_ID, TINY_SIGMA

from service.http.app import create_app
from service.settings import Settings
from smoothing.core import Certificate, Prediction, certify, certify_from_counts, predict, predict_from_counts

SEED = 20190
ALPHA = 0.001
FLIPS_ALLOWED = 2  # samples whose argmax may flip between batch compositions (see the module docstring)


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_body_bytes=100_000, batch_delay_ms=20))) as c:
        yield c


def gray() -> np.ndarray:
    """Mid-gray: the tiny model's noisy counts spread over all classes, class 0 ahead (certifies)."""
    return np.full((28, 28), 128, dtype=np.uint8)


def black() -> np.ndarray:
    """All black: a near-tie between two classes under noise (PREDICT abstains at n = 256)."""
    return np.zeros((28, 28), dtype=np.uint8)


def speckle(seed: int = 0) -> np.ndarray:
    """Uniform random pixels: yet another mixture of classes."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def tensor_of(pixels: np.ndarray) -> torch.Tensor:
    """What the service decodes a PNG of ``pixels`` into: (1, 28, 28) float32 in [0, 1]."""
    return torch.from_numpy(pixels).to(torch.float32).div(255.0).unsqueeze(0)


def png_upload(pixels: np.ndarray) -> dict[str, Any]:
    return {"file": ("input.png", encode_image(pixels), "image/png")}


def library_predict(client: TestClient, pixels: np.ndarray, n: int, seed: int) -> Prediction:
    plan = client.app.state.services.engine.model(TINY_ID).plan
    return predict(
        plan.model,
        tensor_of(pixels),
        sigma=TINY_SIGMA,
        num_classes=len(TINY_CLASSES),
        n=n,
        alpha=ALPHA,
        batch_size=plan.batch_size,
        seed=seed,
        channels_last=plan.channels_last,
    )


def library_certify(client: TestClient, pixels: np.ndarray, n0: int, n: int, seed: int) -> Certificate:
    plan = client.app.state.services.engine.model(TINY_ID).plan
    return certify(
        plan.model,
        tensor_of(pixels),
        sigma=TINY_SIGMA,
        num_classes=len(TINY_CLASSES),
        n0=n0,
        n=n,
        alpha=ALPHA,
        batch_size=plan.batch_size,
        seed=seed,
        channels_last=plan.channels_last,
    )


def assert_counts_agree(service: list[int], library: tuple[int, ...]) -> None:
    assert sum(service) == sum(library)
    moved = sum(abs(a - b) for a, b in zip(service, library, strict=True)) // 2
    assert moved <= FLIPS_ALLOWED, f"service {service} vs library {list(library)}"


def assert_error(response: httpx.Response, status: int, *needles: str) -> None:
    """A JSON {"detail": "..."} answer with ``status`` whose message holds every needle."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for needle in needles:
        assert needle in detail, detail


def histogram_count(name: str, labels: dict[str, str], le: str | None = None) -> float:
    suffix, extra = ("_bucket", {"le": le}) if le else ("_count", {})
    return REGISTRY.get_sample_value(name + suffix, {**labels, **extra}) or 0.0


# -- answers -----------------------------------------------------------------------------------------


def test_models_are_listed_with_their_measured_batch(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["id"] for m in models] == [TINY_ID]
    info = client.get(f"/v1/models/{TINY_ID}").json()
    assert info == models[0]
    assert info["input_shape"] == [1, 28, 28] and info["sigma"] == TINY_SIGMA and info["classes"] == TINY_CLASSES
    assert info["batch_size"] == TINY_BATCH and info["samples_per_second"] > 0 and len(info["sha256"]) == 64
    assert info["interactive_batch_size"] == TINY_BATCH  # the only size swept
    assert_error(client.get("/v1/models/nope"), 404, "unknown model 'nope'", TINY_ID)


@pytest.mark.parametrize("pixels", [gray(), black(), speckle()], ids=["gray", "black", "speckle"])
def test_predict_png_upload_matches_the_library(client: TestClient, pixels: np.ndarray) -> None:
    response = client.post("/v1/predict", files=png_upload(pixels), data={"n": "256", "seed": str(SEED)})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = library_predict(client, pixels, 256, SEED)
    assert_counts_agree(body["counts"], expected.counts)
    decision = predict_from_counts(torch.tensor(body["counts"]), alpha=ALPHA, sigma=TINY_SIGMA)
    assert (body["label"], body["p_value"]) == (decision.label, decision.p_value)
    if tuple(body["counts"]) == expected.counts:
        assert body["label"] == expected.label
    assert body["abstained"] == (body["label"] is None)
    assert body["class_name"] == (None if body["label"] is None else TINY_CLASSES[body["label"]])
    assert (body["n"], body["alpha"], body["sigma"], body["seed"]) == (256, ALPHA, TINY_SIGMA, SEED)
    assert body["model"] == TINY_ID and len(body["checkpoint_sha256"]) == 64 and body["cached"] is False
    assert body["queued_s"] >= 0 and body["compute_s"] > 0


def test_predict_abstains_on_a_near_tie(client: TestClient) -> None:
    body = client.post("/v1/predict", files=png_upload(black()), data={"n": "256", "seed": str(SEED)}).json()
    assert body["abstained"] is True and body["label"] is None and body["class_name"] is None
    assert body["p_value"] > ALPHA


def test_json_base64_and_array_give_the_png_upload_answer(client: TestClient) -> None:
    pixels = speckle(1)
    params = {"n": 256, "seed": SEED}
    upload = client.post("/v1/predict", files=png_upload(pixels), data={k: str(v) for k, v in params.items()}).json()
    encoded = base64.b64encode(encode_image(pixels)).decode()
    from_base64 = client.post("/v1/predict", json={"image_base64": encoded, **params}).json()
    values = (pixels.astype(np.float32) / 255.0).tolist()  # float32 values: the same tensor as the PNG decodes to
    from_array = client.post("/v1/predict", json={"array": values, "shape": [1, 28, 28], **params}).json()
    expected = library_predict(client, pixels, 256, SEED)
    for body in (upload, from_base64, from_array):
        assert_counts_agree(body["counts"], expected.counts)


def test_certify_matches_the_library(client: TestClient) -> None:
    pixels = gray()
    values = (pixels.astype(np.float32) / 255.0).ravel().tolist()
    response = client.post(
        "/v1/certify", json={"array": values, "shape": [1, 28, 28], "n0": 64, "n": 512, "seed": SEED}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = library_certify(client, pixels, 64, 512, SEED)
    assert_counts_agree(body["selection_counts"], expected.selection_counts)
    assert_counts_agree(body["estimation_counts"], expected.estimation_counts)
    decision = certify_from_counts(
        torch.tensor(body["selection_counts"]), torch.tensor(body["estimation_counts"]), alpha=ALPHA, sigma=TINY_SIGMA
    )
    assert (body["label"], body["radius"], body["p_a_lower"]) == (decision.label, decision.radius, decision.p_a_lower)
    assert body["label"] == 0 and body["radius"] > 0 and body["class_name"] == TINY_CLASSES[0]
    assert (body["n0"], body["n"], body["alpha"], body["seed"], body["cached"]) == (64, 512, ALPHA, SEED, False)


def test_certify_again_without_a_seed_is_a_cache_hit(client: TestClient) -> None:
    upload = png_upload(speckle(2))
    first = client.post("/v1/certify", files=upload, data={"n0": "32", "n": "128"}).json()
    hits = REGISTRY.get_sample_value("certserve_cache_requests_total", {"result": "hit"})
    again = client.post("/v1/certify", files=upload, data={"n0": "32", "n": "128"}).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["seed"] == first["seed"]  # the seed that produced the stored certificate
    same = ("label", "radius", "p_a_lower", "selection_counts", "estimation_counts", "n0", "n", "alpha")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    assert REGISTRY.get_sample_value("certserve_cache_requests_total", {"result": "hit"}) == hits + 1
    other_n = client.post("/v1/certify", files=upload, data={"n0": "32", "n": "160"}).json()
    assert other_n["cached"] is False and other_n["seed"] != first["seed"]


def test_defaults_apply_when_parameters_are_left_out(client: TestClient) -> None:
    body = client.post("/v1/predict", files=png_upload(gray()), data={"n": ""}).json()  # empty field = default
    assert body["n"] == 1000 and body["alpha"] == 0.001 and sum(body["counts"]) == 1000
    assert 0 <= body["seed"] < 2**63


def test_resize_accepts_another_size(client: TestClient) -> None:
    upload = png_upload(np.full((56, 40), 128, dtype=np.uint8))
    assert_error(client.post("/v1/predict", files=upload, data={"n": "32"}), 422, "1×56×40", "1×28×28")
    body = client.post("/v1/predict", files=upload, data={"n": "32", "resize": "true", "seed": "5"}).json()
    assert sum(body["counts"]) == 32


# -- limits and bad input ------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    big = b"{" + b" " * 200_000 + b"}"
    assert_error(client.post("/v1/predict", content=big, headers={"content-type": "application/json"}), 413, "100000")


def test_body_over_the_limit_without_content_length_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked, with no Content-Length
        for _ in range(30):
            yield b" " * 10_000

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "larger than the limit of 100000 bytes")


def test_pixel_bomb_is_413_before_decoding(client: TestClient) -> None:
    upload = {"file": ("bomb.png", bomb_png(5000, 5000), "image/png")}  # 25 M pixels in 60 bytes
    assert_error(client.post("/v1/predict", files=upload), 413, "5000×5000 = 25000000 pixels; the limit is 16777216")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"n": 2_000_000}, "n = 2000000 is above the service's limit of 1000000"),
        ({"n0": 1_000_001}, "n0 = 1000001 is above"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"alpha": 0.5}, "alpha: Input should be less than 0.5"),
        ({"alpha": 0}, "alpha: Input should be greater than 0"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": "often"}, "alpha: Input should be a valid number"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"nn": 5}, "nn: Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_are_422(client: TestClient, fields: dict[str, Any], needle: str) -> None:
    data = {k: str(v) for k, v in fields.items()}
    assert_error(client.post("/v1/certify", files=png_upload(gray()), data=data), 422, needle)


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/predict", files=png_upload(gray()), data={"model": "resnet9000"})
    assert_error(response, 404, "unknown model 'resnet9000'", f"loaded models: {TINY_ID}")


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (b"this is not an image", 415, "not an image format"),
        (encode_image(speckle())[:200], 422, "corrupt or truncated"),
        (b"", 422, "empty"),
    ],
    ids=["text", "truncated", "empty"],
)
def test_undecodable_uploads(client: TestClient, data: bytes, status: int, needle: str) -> None:
    assert_error(client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}), status, needle)


@pytest.mark.parametrize(
    ("array_text", "shape", "needle"),
    [
        ("[NaN" + ", 0.5" * 783 + "]", [1, 28, 28], "1 NaN or infinite values (first at flat index 0)"),
        ("[0.5, Infinity" + ", 0.5" * 782 + "]", [1, 28, 28], "first at flat index 1"),
        ("[-Infinity" + ", 0.5" * 783 + "]", [1, 28, 28], "NaN or infinite"),
        ("[1.5" + ", 0.5" * 783 + "]", [1, 28, 28], "(pixel intensities); found min 0.5, max 1.5"),
        ("[-0.25" + ", 0.5" * 783 + "]", [1, 28, 28], "found min -0.25"),
        ("[255" + ", 0" * 783 + "]", [1, 28, 28], "max 255"),
        ("[0.5" + ", 0.5" * 1023 + "]", [1, 32, 32], "input shape 1×32×32 does not match the model's 1×28×28"),
        ("[0.5" + ", 0.5" * 2351 + "]", [3, 28, 28], "3 channels, the model takes 1"),
        ("[0.5, 0.5]", [1, 28, 28], "has 2 values but shape [1, 28, 28] needs 784"),
    ],
    ids=["nan", "inf", "-inf", "above-1", "below-0", "0-255", "height-width", "channels", "count"],
)
def test_bad_arrays_are_422(client: TestClient, array_text: str, shape: list[int], needle: str) -> None:
    body = f'{{"array": {array_text}, "shape": {shape}, "n": 16}}'.encode()
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, needle)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"array": [0.5', "Invalid JSON"),
        (b'{"n": 16}', "give exactly one of image_base64 or array"),
        (b'{"array": [0.5], "image_base64": "AAAA"}', "give exactly one"),
        (b'{"array": [0.5]}', "array needs its shape"),
        (b'{"image_base64": "@@not base64@@"}', "image_base64 is not valid base64"),
        (b'{"image_base64": "aGVsbG8="}', "not an image format"),
    ],
)
def test_bad_json_bodies(client: TestClient, body: bytes, needle: str) -> None:
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (415, 422)
    assert_error(response, response.status_code, needle)


def test_wrong_content_type_and_missing_file(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b"n=5", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported content type 'text/plain'")
    response = client.post("/v1/predict", files={"image": ("x.png", encode_image(gray()), "image/png")})
    assert_error(response, 422, "field 'file'")


def test_queue_full_is_503_with_retry_after(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(max_pending_samples=1_000))) as small_queue:
        response = small_queue.post("/v1/certify", files=png_upload(gray()), data={"n0": "32", "n": "5000"})
        assert_error(response, 503, "server busy", "limit 1000")
        assert int(response.headers["retry-after"]) >= 1


def test_job_routes_validate_their_input(client: TestClient) -> None:
    response = client.post("/v1/jobs", files={"file": ("set.bin", b"garbage bytes", "application/octet-stream")})
    assert 400 <= response.status_code < 500 and isinstance(response.json()["detail"], str)
    assert_error(client.get("/v1/jobs/not-a-job"), 404, "no job 'not-a-job'")
    assert_error(client.get("/v1/jobs/not-a-job/results", params={"format": "xml"}), 422, "format")
    assert_error(client.post("/v1/jobs", json={"n": 5}), 415, "multipart/form-data")


# -- health and metrics ------------------------------------------------------------------------------


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/v2/health/live").status_code == 200
    for path in ("/readyz", "/v2/health/ready"):
        ready = client.get(path)
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"models_loaded": True, "executor_alive": True}
    client.post("/v1/predict", files=png_upload(gray()), data={"n": "16"})
    text = client.get("/metrics").text
    assert f'certserve_request_latency_seconds_count{{endpoint="predict",model="{TINY_ID}"}}' in text
    assert "certserve_pending_samples 0.0" in text
    assert f'certserve_batch_samples_bucket{{executor="cpu",le="16384.0",model="{TINY_ID}"}}' in text
    assert 'certserve_http_responses_total{cause="ok",code="200",route="/v1/predict"}' in text


def test_openapi_documents_both_bodies_and_the_radius_units(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    certify_doc = spec["paths"]["/v1/certify"]["post"]
    content = certify_doc["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert {"file", "n0", "n", "alpha", "seed", "model", "resize"} <= set(
        content["multipart/form-data"]["schema"]["properties"]
    )
    assert {"image_base64", "array", "shape"} <= set(content["application/json"]["schema"]["properties"])
    units = "ℓ2 distances in [0, 1] pixel space at the model's input resolution"
    assert units in certify_doc["description"] and units in spec["info"]["description"]
    assert {"404", "413", "415", "422", "503", "504"} <= set(certify_doc["responses"])


def test_readiness_fails_when_the_executor_is_gone(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as fresh:
        fresh.app.state.services.pool.stop()
        response = fresh.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert (body["status"], body["checks"]) == ("not ready", {"models_loaded": True, "executor_alive": False})
        assert [(d["name"], d["alive"]) for d in body["devices"]] == [("cpu", False)]
        assert fresh.get("/healthz").status_code == 200  # liveness does not depend on it


# -- API keys ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_keys=["key-one", "key-two"]))) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_401_403_and_open_health(keyed: TestClient) -> None:
    missing = keyed.get("/v1/models")
    assert_error(missing, 401, "missing API key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(keyed.get("/v1/models", headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401, "missing API key")
    assert_error(keyed.get("/v1/models", headers=bearer("key-three")), 403, "invalid API key")
    assert_error(keyed.post("/v1/predict", files=png_upload(gray()), headers=bearer("key-on")), 403)
    assert keyed.get("/v1/models", headers=bearer("key-one")).status_code == 200
    answer = keyed.post("/v1/predict", files=png_upload(gray()), data={"n": "16"}, headers=bearer("key-two"))
    assert answer.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert keyed.get(path).status_code == 200, path


def npz_upload(count: int) -> dict[str, Any]:
    buffer = io.BytesIO()
    images = np.stack([gray(), speckle(3), black()][:count])
    np.savez(buffer, images=images, labels=np.arange(count))
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def test_jobs_are_visible_only_to_their_key(keyed: TestClient) -> None:
    created = keyed.post("/v1/jobs", files=npz_upload(2), data={"n0": "32", "n": "64"}, headers=bearer("key-one"))
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
    assert len(job["id"]) >= 20
    for method, path in [("GET", job["status_url"]), ("GET", job["results_url"]), ("DELETE", job["status_url"])]:
        assert_error(keyed.request(method, path, headers=bearer("key-two")), 404, "no job")
        assert_error(keyed.request(method, path), 401)
    deadline = time.monotonic() + 15
    while (status := keyed.get(job["status_url"], headers=bearer("key-one")).json())["state"] != "done":
        assert time.monotonic() < deadline and status["state"] in ("queued", "running"), status
        time.sleep(0.1)
    assert (status["done"], status["total"]) == (2, 2)
    rows = keyed.get(job["results_url"], headers=bearer("key-one")).json()["results"]
    assert [r["idx"] for r in rows] == [0, 1] and [r["label"] for r in rows] == [0, 1]
    tsv = keyed.get(job["results_url"], params={"format": "tsv"}, headers=bearer("key-one"))
    assert tsv.headers["content-type"].startswith("text/tab-separated-values")
    assert tsv.text.splitlines()[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "samples"]
    assert len(tsv.text.splitlines()) == 3


def test_a_job_can_be_cancelled(keyed: TestClient) -> None:
    created = keyed.post(
        "/v1/jobs", files=npz_upload(3), data={"n0": "32", "n": "200000"}, headers=bearer("key-one")
    ).json()
    cancelled = keyed.delete(created["status_url"], headers=bearer("key-one"))
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
    assert cancelled.json()["state"] == "cancelled"
    status = keyed.get(created["status_url"], headers=bearer("key-one")).json()
    assert status["state"] == "cancelled" and status["done"] < 3


# -- scheduling seen through the API -------------------------------------------------------------------


def test_predict_finishes_while_a_large_certification_is_in_flight(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(request_timeout_s=5.0))) as busy:
        scheduler = busy.app.state.services.scheduler
        with ThreadPoolExecutor(1) as pool:
            large = pool.submit(busy.post, "/v1/certify", files=png_upload(gray()), data={"n0": "100", "n": "1000000"})
            deadline = time.monotonic() + 5
            while scheduler.pending_samples == 0:
                assert time.monotonic() < deadline, "the certification never reached the scheduler"
                time.sleep(0.01)
            time.sleep(0.3)  # it is computing now
            started = time.monotonic()
            quick = busy.post("/v1/predict", files=png_upload(speckle()), data={"n": "64"})
            quick_s = time.monotonic() - started
            assert quick.status_code == 200 and sum(quick.json()["counts"]) == 64
            assert not large.done(), "the certification finished first"
            assert quick_s < 3.0
            # 1,000,000 samples take minutes here: the 5 s deadline ends it and drops its remaining work.
            assert_error(large.result(timeout=15), 504, "did not finish within 5 s")
        deadline = time.monotonic() + 5
        while scheduler.pending_samples:
            assert time.monotonic() < deadline, f"{scheduler.pending_samples} samples still pending"
            time.sleep(0.05)


def test_concurrent_requests_share_forward_passes(client: TestClient) -> None:
    """K requests of 100 samples each (below the scheduler's 128-sample chunk): a forward pass of more than
    128 samples can only have been filled from several requests."""
    labels = {"model": TINY_ID, "executor": "cpu"}
    chunk_size = client.app.state.services.scheduler.chunk_size
    assert chunk_size == 128
    before_all = histogram_count("certserve_batch_samples", labels)
    before_small = histogram_count("certserve_batch_samples", labels, le=f"{float(chunk_size)}")
    barrier = threading.Barrier(8)

    def one(i: int) -> dict[str, Any]:
        barrier.wait()
        return client.post("/v1/predict", files=png_upload(speckle(10 + i)), data={"n": "100", "seed": str(i)}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(sum(a["counts"]) == 100 for a in answers)
    passes = histogram_count("certserve_batch_samples", labels) - before_all
    small = histogram_count("certserve_batch_samples", labels, le=f"{float(chunk_size)}") - before_small
    assert passes - small >= 1, f"{passes:.0f} forward passes, none above {chunk_size} samples"
    assert passes < 8  # fewer forward passes than requests
