"""Hostile input that once gave 500s, echoed itself whole, or was coerced: each answered with a short 4xx."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from payloads import encode_image
from pydantic import ValidationError

from service.http.app import create_app
from service.settings import Settings

SHORT = 300  # characters: any detail quoting a huge input must stay below this


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_body_bytes=1_000_000))) as c:
        yield c


def png() -> dict:
    return {"file": ("x.png", encode_image(np.full((28, 28), 128, dtype=np.uint8)), "image/png")}


def npz_with_header(shape: tuple[int, ...], data: bytes, labels: np.ndarray | None = None) -> dict:
    """An .npz whose images.npy header claims ``shape`` (uint8) but holds only ``data``."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": shape})
    npy.write(data)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("images.npy", npy.getvalue())
        if labels is not None:
            labels_npy = io.BytesIO()
            np.save(labels_npy, labels)
            archive.writestr("labels.npy", labels_npy.getvalue())
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def assert_short_error(response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    text = response.json()["detail"]
    assert len(text) < SHORT, text
    for needle in needles:
        assert needle in text, text


def test_a_shape_whose_product_cannot_be_printed_is_a_422(client: TestClient) -> None:
    body = {"array": [0.5] * 4, "shape": [1, 10**2200, 10**2200], "n": 10}
    assert_short_error(client.post("/v1/predict", json=body), 422, "shape")
    assert_short_error(client.post("/v1/predict", json={"array": [0.5], "shape": [1, 1, 1, 1]}), 422, "shape")


def test_an_npz_header_claiming_a_billion_images_is_refused_before_allocating(client: TestClient) -> None:
    for shape in ((10**9, 28, 28), (500, 28, 28)):  # the bytes its shape needs are not there
        assert_short_error(client.post("/v1/jobs", files=npz_with_header(shape, b"\0" * 1000)), 400, "holds 1000")


def test_job_labels_must_be_classes_of_the_model(client: TestClient) -> None:
    images = np.zeros(2 * 28 * 28, dtype=np.uint8).tobytes()
    for bad in (99, 2**62):
        upload = npz_with_header((2, 28, 28), images, labels=np.array([1, bad], dtype=np.int64))
        assert_short_error(client.post("/v1/jobs", files=upload, data={"n": 10}), 422, str(bad), "0 to 9")


def test_error_messages_quote_huge_inputs_by_their_start(client: TestClient) -> None:
    assert_short_error(client.post("/v1/predict", files=png(), data={"model": "m" * 10_000}), 404, "unknown model")
    assert_short_error(client.get("/v1/jobs/" + "j" * 10_000), 404, "no job")
    huge_n = '{"array": [0.5], "shape": [1, 1], "n": ' + "9" * 4001 + "}"
    response = client.post("/v1/predict", content=huge_n, headers={"Content-Type": "application/json"})
    assert_short_error(response, 422)
    response = client.post("/v1/predict", files=png(), data={"x" * 5000: "1"})
    assert 400 <= response.status_code < 500 and len(response.json()["detail"]) < SHORT, response.text


@pytest.mark.parametrize(
    "field, value",
    [("resize", 0), ("resize", "true"), ("seed", "1.0"), ("seed", 1.0), ("n", "100"), ("n", 100.0)],
)
def test_json_parameters_are_not_coerced(client: TestClient, field: str, value: object) -> None:
    body = {"array": [0.5] * 784, "shape": [1, 28, 28], field: value}
    assert_short_error(client.post("/v1/predict", json=body), 422, field)


@pytest.mark.parametrize("field, text", [("resize", "0"), ("seed", "1.0"), ("n", "1e2"), ("resize", "yes")])
def test_form_parameters_are_not_coerced(client: TestClient, field: str, text: str) -> None:
    assert_short_error(client.post("/v1/predict", files=png(), data={field: text}), 422, field)
    ok = client.post("/v1/predict", files=png(), data={"n": "16", "resize": "false", "seed": "3"})
    assert ok.status_code == 200 and ok.json()["n"] == 16 and ok.json()["seed"] == 3


def test_a_form_field_given_twice_is_refused(client: TestClient) -> None:
    response = client.post("/v1/predict", files=png(), data={"n": ["16", "32"]})
    assert_short_error(response, 422, "more than once", "'n'")


@pytest.mark.parametrize("field", ["default_n", "default_n0", "default_predict_n"])
def test_defaults_above_max_n_are_refused_at_start_up(make_settings: Callable[..., Settings], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(max_n=1000, **{field: 1001})
    assert f"CERTSERVE_{field.upper()}" in str(refused.value) and "CERTSERVE_MAX_N" in str(refused.value)
    make_settings(max_n=1000, default_n=1000, default_n0=100, default_predict_n=1000)  # at the limit is fine


def test_openapi_declares_security_only_with_keys(client: TestClient, make_settings: Callable[..., Settings]) -> None:
    spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())
    assert "401" not in spec["paths"]["/v1/predict"]["post"]["responses"]
    with TestClient(create_app(make_settings(api_keys=["k"]))) as keyed:
        spec = keyed.get("/openapi.json").json()
    assert "securitySchemes" in spec["components"]
    for path in ("/v1/models", "/v1/models/{model_id}", "/v1/predict", "/v1/jobs/{job_id}"):
        operation = next(iter(spec["paths"][path].values()))
        assert {"401", "403"} <= set(operation["responses"]) and operation["security"], path


def test_openapi_names_the_content_types_of_metrics_and_tsv_results(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert any(t.startswith("text/plain") for t in paths["/metrics"]["get"]["responses"]["200"]["content"])
    results = paths["/v1/jobs/{job_id}/results"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/tab-separated-values"} <= set(results)


def test_options_and_405_list_every_method_of_a_path(client: TestClient) -> None:
    options = client.options("/v1/jobs/some-id")
    assert options.status_code == 204 and options.headers["allow"] == "GET, DELETE, OPTIONS"
    wrong = client.put("/v1/jobs/some-id")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, DELETE, OPTIONS"
    assert "DELETE" in wrong.json()["detail"]


def test_the_shared_cache_gives_another_tenant_no_client_seed(make_settings: Callable[..., Settings]) -> None:
    """Certificates are shared across API keys by design (README): only server-seeded ones, whose seed is
    no one's secret. A seed a tenant chose is never stored, so another tenant cannot learn it."""
    with TestClient(create_app(make_settings(api_keys=["tenant-a", "tenant-b"]))) as keyed:
        a = {"Authorization": "Bearer tenant-a"}
        b = {"Authorization": "Bearer tenant-b"}
        fields = {"n0": "16", "n": "64"}
        chosen = keyed.post("/v1/certify", files=png(), data={**fields, "seed": "424242"}, headers=a).json()
        assert chosen["seed"] == 424242 and chosen["seed_source"] == "client"
        other = keyed.post("/v1/certify", files=png(), data=fields, headers=b).json()
        assert not other["cached"] and other["seed"] != 424242 and other["seed_source"] == "server"
        shared = keyed.post("/v1/certify", files=png(), data=fields, headers=a).json()  # B's, shared
        assert shared["cached"] and shared["seed"] == other["seed"] and shared["seed_source"] == "server"
