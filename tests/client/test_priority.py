"""Per-request control against the real server: priority classes with their own queue bounds, and timeout_s."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from client_helpers import API_KEY, TIGHT_PENDING_SAMPLES, near_gray, png, wait_for_pending, wait_until_idle

from certserve_client import Client, DeadlineExceeded, RetryPolicy, ServerBusy

pytestmark = pytest.mark.slow  # every test talks to a server process

NO_RETRY = RetryPolicy(retries=0)


def batch_certify(base: str, samples: int) -> str:
    """A batch-priority certification of a fresh image: 'ok' or 'busy' (503)."""
    image = np.random.default_rng().random((1, 28, 28), dtype=np.float32)
    with Client(base, retry=NO_RETRY) as client:
        try:
            client.certify(image, n0=100, n=samples - 100, priority="batch")
        except ServerBusy:
            return "busy"
    return "ok"


def test_a_flood_of_batch_certifications_does_not_503_interactive_requests(tight_server: str) -> None:
    flood = 6
    each = TIGHT_PENDING_SAMPLES // 2  # two fit in the batch class's bound
    with ThreadPoolExecutor(flood) as pool, Client(tight_server, retry=NO_RETRY) as client:
        outcomes = [pool.submit(batch_certify, tight_server, each) for _ in range(flood)]
        wait_for_pending(tight_server, each / 2)
        with pytest.raises(ServerBusy, match="of job work already pending"):  # the batch class is full...
            client.predict(png(near_gray()), n=TIGHT_PENDING_SAMPLES - 100, priority="batch")
        # ...and interactive work, as large as the whole bound allows, is still taken and answered.
        prediction = client.predict(png(near_gray()), n=TIGHT_PENDING_SAMPLES - 100)
        certificate = client.certify(png(near_gray()), n0=100, n=TIGHT_PENDING_SAMPLES - 200, priority="interactive")
        results = [o.result() for o in outcomes]
    assert prediction.n == TIGHT_PENDING_SAMPLES - 100 and certificate.samples == TIGHT_PENDING_SAMPLES - 100
    assert "busy" in results and "ok" in results  # the flood was more than its class could queue


def test_a_short_timeout_gives_504_and_drops_the_remaining_work(server: str) -> None:
    with Client(server, api_key=API_KEY) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="remaining work was dropped") as raised:
            client.certify(png(near_gray()), n=100_000, timeout_s=0.5)
        assert raised.value.status_code == 504 and time.monotonic() - started < 10
        wait_until_idle(server, timeout_s=5)  # nothing left queued for it
        assert client.predict(png(near_gray()), n=100, timeout_s=30).n == 100  # a sufficient timeout is fine


def test_timeout_s_never_extends_the_servers_deadline(deadline_server: str) -> None:
    with Client(deadline_server) as client, pytest.raises(DeadlineExceeded):
        client.certify(png(near_gray()), n=50_000, timeout_s=600)  # cut to the server's 0.3 s
