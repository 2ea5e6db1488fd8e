"""``Client`` against the real server: every call, every error the server can answer, retries and the progress bar."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from client_helpers import (
    API_KEY,
    OTHER_KEY,
    TIGHT_PENDING_SAMPLES,
    RecordingTransport,
    black,
    gray,
    images_zip,
    near_gray,
    png,
    wait_for_pending,
    wait_until_idle,
)
from live_server import free_port

from certserve_client import (
    AuthenticationRequired,
    Certificate,
    Client,
    DeadlineExceeded,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Prediction,
    RetryPolicy,
    ServerBusy,
    ServerUnavailable,
    SignatureError,
    UnsupportedInput,
)
from certserve_client.signatures import SIGNATURE_SCHEME, canonical_payload
from service.signing import canonical_payload as server_payload
from service.signing import verify as server_verify

pytestmark = pytest.mark.slow  # every test talks to a server process


@pytest.fixture
def client(server: str) -> Client:
    with Client(server, api_key=API_KEY) as c:
        yield c


def test_models(client: Client) -> None:
    (tiny,) = client.models()
    assert tiny.id == "tiny" and tiny.input_shape == (1, 28, 28) and tiny.sigma == 0.25 and len(tiny.classes) == 10
    assert client.model("tiny") == tiny
    with pytest.raises(NotFound, match="unknown model 'nope'") as raised:
        client.model("nope")
    assert raised.value.status_code == 404 and "loaded models: tiny" in raised.value.detail


def test_predict_takes_a_path_bytes_or_an_array(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    path.write_bytes(png(gray()))
    by_path = client.predict(path, n=300, seed=7)
    by_bytes = client.predict(png(gray()), n=300, seed=7)
    by_array = client.predict(gray()[None].astype(np.float32) / 255.0, n=300, seed=7)
    assert isinstance(by_path, Prediction) and by_path.n == 300 and by_path.seed == 7
    assert by_path.counts == by_bytes.counts == by_array.counts  # the same input and seed: the same samples
    assert by_path.label == 0 and by_path.class_name == "t-shirt" and not by_path.abstained and by_path.p_value < 0.001


def test_predict_abstention_is_typed(client: Client) -> None:
    answer = client.predict(png(black()), n=256, seed=20190)
    assert answer.abstained and answer.label is None and answer.class_name is None and answer.p_value > answer.alpha


def test_certify_every_mode(client: Client) -> None:
    image = png(near_gray())
    fixed = client.certify(image, n0=64, n=400)
    assert isinstance(fixed, Certificate) and fixed.mode == "fixed" and fixed.samples == 464
    assert fixed.certified and fixed.radius > 0 and fixed.certified_at_radius is None and not fixed.cached
    assert sum(fixed.estimation_counts) == 400 and sum(fixed.selection_counts) == 64 and fixed.seed_source == "server"
    again = client.certify(image, n0=64, n=400)  # the cache answers, with the original's samples
    assert again.cached and again.estimation_counts == fixed.estimation_counts and again.seed == fixed.seed
    seeded = client.certify(image, n0=64, n=400, seed=2)  # a client's seed: computed afresh, never shared
    assert not seeded.cached and seeded.seed == 2 and seeded.seed_source == "client"

    decided = client.certify(image, n0=64, n=400, radius=5.0)  # far beyond what 400 samples can certify
    assert decided.target_radius == 5.0 and decided.certified_at_radius is False and not decided.certified

    adaptive = client.certify(image, mode="adaptive", n0=64, n=1600, tolerance=0.05, seed=4)
    assert adaptive.mode == "adaptive" and adaptive.n_max == 1600 and adaptive.samples <= 64 + 1600
    assert adaptive.target_radius is None and adaptive.certified

    small = client.certify(image, mode="adaptive", radius=0.01, n=3200, seed=5)
    assert small.certified_at_radius is True and small.certified and small.max_certifiable_radius > 0.01
    assert small.samples < 100 + 3200  # decided before the last look


def test_signed_certificates_verify(client: Client) -> None:
    key = client.signing_key()
    assert key.algorithm == SIGNATURE_SCHEME and "BEGIN PUBLIC KEY" in key.public_key_pem
    for mode, radius in (("fixed", None), ("fixed", 0.1), ("adaptive", 0.01), ("adaptive", None)):
        certificate = client.certify(png(gray()), mode=mode, radius=radius, n0=32, n=800, verify=True)
        assert certificate.signature and certificate.verify(key.public_key_pem)
        # The client builds the very bytes the server signed, and agrees with the server's own check.
        assert canonical_payload(certificate.raw) == server_payload(certificate.raw)
        assert server_verify(certificate.raw, key.public_key_pem.encode())
    tampered = Certificate.from_json({**certificate.raw, "radius": certificate.radius + 0.1})
    assert not tampered.verify(key.public_key_pem) and not server_verify(tampered.raw, key.public_key_pem)


def test_an_unsigned_certificate_fails_verification(tight_server: str) -> None:
    with Client(tight_server) as unsigned, pytest.raises(SignatureError, match="no signature"):
        unsigned.certify(png(gray()), n0=32, n=64, verify=True)
    with Client(tight_server) as unsigned, pytest.raises(NotFound, match="does not sign"):
        unsigned.signing_key()


def test_answers_keep_fields_the_client_does_not_know(client: Client) -> None:
    answer = client.certify(png(gray()), n0=32, n=128, seed=11)
    assert answer.raw["queued_s"] == answer.queued_s
    unknown = set(answer.raw) - set(Certificate.model_fields)
    for name in unknown:  # a newer server's fields stay readable
        assert getattr(answer, name) == answer.raw[name]


def test_api_keys(server: str) -> None:
    with Client(server) as anonymous, pytest.raises(AuthenticationRequired, match="missing API key") as raised:
        anonymous.models()
    assert raised.value.status_code == 401
    with Client(server, api_key="wrong") as wrong, pytest.raises(InvalidApiKey, match="invalid API key"):
        wrong.predict(png(gray()), n=10)
    with Client(server, api_key=API_KEY) as mine, Client(server, api_key=OTHER_KEY) as theirs:
        created = mine.submit_job(images_zip(1), n0=16, n=32)
        with pytest.raises(NotFound, match="another API key"):
            theirs.job(created)
        with pytest.raises(NotFound):
            theirs.cancel(created)
        assert mine.wait(created, timeout=60).state == "done"


def test_bad_input_errors_carry_the_servers_message(client: Client) -> None:
    with pytest.raises(PayloadTooLarge, match="larger than the limit of 200000 bytes") as raised:
        client.predict(b"\x00" * 300_000)
    assert raised.value.status_code == 413
    with pytest.raises(UnsupportedInput) as raised:
        client.predict(b"this is not an image")
    assert raised.value.status_code == 415
    with pytest.raises(InvalidRequest, match=r"alpha: .*less than 0\.5") as raised:
        client.certify(png(gray()), alpha=0.7)
    assert raised.value.status_code == 422
    with pytest.raises(InvalidRequest, match="28"):
        client.predict(np.zeros((1, 5, 5), dtype=np.float32), n=10)
    with pytest.raises(NotFound, match="unknown model"):
        client.certify(png(gray()), model="nope")


def test_an_unreachable_server_is_unavailable_after_the_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retry=RetryPolicy(retries=2, backoff_s=0.05)) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="cannot reach") as raised:
            client.models()
    assert raised.value.status_code is None and time.monotonic() - started >= 0.05 * (1 + 2) * 0.75


def test_a_job_from_submit_to_results(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    created = client.submit_job(images_zip(3), filename="three.zip", n0=16, n=64, seed=3)
    assert created.status_url == f"/v1/jobs/{created.id}"
    status = client.wait(created, progress=True, poll_s=0.1, timeout=120)
    assert status.state == "done" and status.done == status.total == 3 and status.finished
    bar = capsys.readouterr().err
    assert f"job {created.id[:8]}" in bar and "3/3" in bar and "abstained=" in bar  # tqdm's bar on stderr
    rows = client.results(created)
    assert rows.state == "done" and [r.idx for r in rows.results] == [0, 1, 2]
    assert all(r.radius >= 0 and r.abstained == (r.predict is None) for r in rows.results)
    tsv = client.results(created.id, "tsv").splitlines()
    assert tsv[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "samples"] and len(tsv) == 4
    assert client.cancel(created).cancelled is False  # finished: nothing to cancel
    assert client.job(created.id).state == "done" and created.id in [j.id for j in client.jobs()]


def test_a_job_of_radius_decisions(client: Client) -> None:
    # n0 = 100 and a job seed: this checks how the client models the rows, not the decision's power at n0 = 16.
    created = client.submit_job(images_zip(2), mode="adaptive", radius=0.01, n0=100, n=3200, seed=1)
    assert client.wait(created, timeout=120).state == "done"
    rows = client.results(created).results
    assert [row.certified_at_radius for row in rows] == [True, True]  # a field the client models as extra
    assert all(row.samples < 100 + 3200 for row in rows)


def test_cancel_a_running_job(client: Client, server: str) -> None:
    created = client.submit_job(images_zip(20), n0=100, n=100_000)
    wait_for_pending(server, 1)
    cancelled = client.cancel(created)
    assert cancelled.cancelled is True and cancelled.state == "cancelled"
    assert client.wait(created, timeout=10).state == "cancelled"
    wait_until_idle(server)


def occupy_queue(base: str, samples: int) -> threading.Thread:
    """A certification holding ``samples`` of the tight server's queue, running in the background."""
    image = np.random.default_rng().random((1, 28, 28), dtype=np.float32)  # never cached

    def run() -> None:
        with Client(base, retry=RetryPolicy(retries=0)) as c:
            c.certify(image, n0=100, n=samples - 100)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_pending(base, samples / 4)
    return thread


def test_503_raises_server_busy_with_retry_after(tight_server: str) -> None:
    thread = occupy_queue(tight_server, TIGHT_PENDING_SAMPLES - 100)
    try:
        with (
            Client(tight_server, retry=RetryPolicy(retries=0)) as client,
            pytest.raises(ServerBusy, match="noise samples of certify work already pending") as raised,
        ):
            client.certify(png(near_gray()), n0=TIGHT_PENDING_SAMPLES - 200, n=100)  # the occupier's class
        assert raised.value.status_code == 503 and raised.value.retry_after_s >= 1
    finally:
        thread.join()


def test_503_is_retried_after_retry_after(tight_server: str) -> None:
    thread = occupy_queue(tight_server, TIGHT_PENDING_SAMPLES - 100)
    transport = RecordingTransport()
    try:
        with Client(tight_server, transport=transport, retry=RetryPolicy(retries=30, max_wait_s=30)) as client:
            answer = client.certify(png(near_gray()), n0=TIGHT_PENDING_SAMPLES - 200, n=100)
    finally:
        thread.join()
    assert answer.n0 == TIGHT_PENDING_SAMPLES - 200 and transport.statuses[0] == 503 and transport.statuses[-1] == 200


def test_504_when_the_deadline_passes(deadline_server: str) -> None:
    with Client(deadline_server) as client, pytest.raises(DeadlineExceeded, match="remaining work was dropped") as r:
        client.certify(png(gray()), n0=100, n=50_000)
    assert r.value.status_code == 504
    wait_until_idle(deadline_server, timeout_s=5)  # the dropped work is gone from the queue
