"""Certificate integrity: a client cannot fish for a lucky certificate nor plant one in the shared cache,
and signed certificates verify while any changed signed field does not.

The attack these tests reproduce: vary a field that does not change the samples (a fixed-mode
``radius``, by 1e-12) or the seed, keep the best radius, then send the canonical question with
the best seed so that it is cached and served to every honest client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from payloads import encode_image

from service.http.app import create_app
from service.settings import Settings
from service.signing import (
    DECISION_FIELDS,
    SIGNED_FIELDS,
    canonical_payload,
    load_private_key,
    main,
    public_key_pem,
    verify,
)

N0, N = "32", "256"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signing") / "signing.pem"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return path


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], key_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(signing_key_file=key_file))) as c:
        yield c


def image(seed: int) -> dict[str, Any]:
    pixels = np.random.default_rng(seed).integers(96, 160, (28, 28), dtype=np.uint8)
    return {"file": ("x.png", encode_image(pixels), "image/png")}


def certify(client: TestClient, upload: dict[str, Any], **fields: object) -> dict[str, Any]:
    response = client.post("/v1/certify", files=upload, data={"n0": N0, "n": N, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_jitter_of_a_field_outside_the_key_is_a_cache_hit(client: TestClient) -> None:
    """40 requests with radius = i·1e-12 once gave 12 different radii: now they get one certificate."""
    upload = image(1)
    answers = [certify(client, upload, radius=f"{i * 1e-12:.1e}") for i in range(1, 41)]
    assert not answers[0]["cached"] and all(a["cached"] for a in answers[1:])
    assert len({(a["radius"], a["seed"], a["p_a_lower"]) for a in answers}) == 1
    assert {a["seed_source"] for a in answers} == {"server"}


def test_a_seeded_request_never_changes_what_an_unseeded_one_receives(client: TestClient) -> None:
    """Planting: the best of many client seeds, asked again, is computed but never cached or shared."""
    upload = image(2)
    tries = [certify(client, upload, seed=seed) for seed in range(12)]
    assert all(not t["cached"] and t["seed_source"] == "client" for t in tries)
    best = max(tries, key=lambda t: t["radius"])
    replant = certify(client, upload, seed=best["seed"])  # the canonical question with the best seed
    assert not replant["cached"] and replant["seed_source"] == "client"
    honest = certify(client, upload)
    assert not honest["cached"] and honest["seed_source"] == "server"
    assert honest["seed"] not in {t["seed"] for t in tries}
    again = certify(client, upload)
    assert again["cached"] and again["seed"] == honest["seed"] and again["radius"] == honest["radius"]
    # And a seeded request does not read the shared entry either.
    assert not certify(client, upload, seed=3)["cached"]


def test_client_seeded_answers_reproduce_and_server_seeds_are_fresh(client: TestClient) -> None:
    upload = image(3)
    first, second = certify(client, upload, seed=5), certify(client, upload, seed=5)
    same = ("selection_counts", "estimation_counts", "radius", "seed")
    assert {k: first[k] for k in same} == {k: second[k] for k in same}
    a, b = certify(client, image(4), mode="adaptive", n="1000"), certify(client, image(5), mode="adaptive", n="1000")
    assert a["seed"] != b["seed"] and {a["seed_source"], b["seed_source"]} == {"server"}


def test_answers_report_the_arithmetic_the_manifest_and_the_procedure(client: TestClient) -> None:
    answer = certify(client, image(6))
    loaded = client.app.state.services.engine.model(answer["model"])
    assert answer["precision"] == loaded.precision == "float32"
    assert answer["manifest_digest"] == loaded.manifest_digest != answer["checkpoint_sha256"]
    assert len(answer["procedure"]) == 12 and len(answer["input_digest"]) == 64
    predicted = client.post("/v1/predict", files=image(6), data={"n": "64"}).json()
    assert predicted["precision"] == "float32" and predicted["input_digest"] == answer["input_digest"]
    assert predicted["seed_source"] == "server"


def public_key(client: TestClient) -> str:
    response = client.get("/v1/signing-key")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["algorithm"].startswith("ed25519") and len(body["key_id"]) == 16
    return body["public_key_pem"]


def flipped(value: Any) -> Any:
    """``value`` with one bit (or its equivalent) changed."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ 1
    if isinstance(value, float):
        return float(np.nextafter(value, np.inf))
    if isinstance(value, str):
        return value[:-1] + chr(ord(value[-1]) ^ 1)
    if isinstance(value, list):
        return [flipped(value[0]), *value[1:]]
    if value is None:
        return 0
    raise TypeError(type(value))


@pytest.mark.parametrize("mode", [{}, {"mode": "adaptive", "radius": "0.05"}], ids=["fixed", "decision"])
def test_signed_answers_verify_and_any_flipped_field_fails(client: TestClient, mode: dict) -> None:
    pem = public_key(client)
    answer = certify(client, image(7), **mode)
    assert answer["signature"] and answer["signed_at"]
    assert verify(answer, pem)
    fields = SIGNED_FIELDS + (DECISION_FIELDS if mode else ())
    for name in fields:
        tampered = {**answer, name: flipped(answer[name])}
        assert not verify(tampered, pem), name
    assert not verify({**answer, "signature": answer["signature"][:-4] + "AAAA"}, pem)
    assert not verify({k: v for k, v in answer.items() if k != "radius"}, pem)
    # Cached answers carry the original signature, which still verifies.
    again = certify(client, image(7), **mode)
    assert again["cached"] and again["signature"] == answer["signature"] and verify(again, pem)


def test_unsigned_fields_do_not_enter_the_signature(client: TestClient) -> None:
    answer = certify(client, image(8))
    relabelled = {**answer, "cached": not answer["cached"], "queued_s": 99.0, "class_name": "anything"}
    assert canonical_payload(relabelled) == canonical_payload(answer)
    assert verify(relabelled, public_key(client))


def test_without_a_key_answers_are_unsigned_and_the_key_route_is_404(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as plain:
        answer = plain.post("/v1/certify", files=image(9), data={"n0": N0, "n": N}).json()
        assert answer["signature"] is None
        response = plain.get("/v1/signing-key")
        assert response.status_code == 404 and "CERTSERVE_SIGNING_KEY_FILE" in response.json()["detail"]


def test_a_bad_key_file_stops_the_start(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(Exception, match="signing key"), TestClient(create_app(make_settings(signing_key_file=bad))):
        pass


def test_new_key_command_writes_a_key_the_service_loads(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    main(["new-key", str(path)])
    assert path.stat().st_mode & 0o777 == 0o600
    key = load_private_key(path)
    assert (tmp_path / "k.pub.pem").read_text() == public_key_pem(key.public_key())
    with pytest.raises(SystemExit):
        main(["new-key", str(path)])  # never overwrites a key
