"""The real server (``python -m service``) under slow clients and SIGTERM: JSON answers, never a hang or a 500."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import start_server
from payloads import encode_image

pytestmark = pytest.mark.slow  # starting a server process takes several seconds

GRACE_S = 3.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(
    tiny_registry: Path, tuning_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    folder = tmp_path_factory.mktemp("shutdown")
    env = {
        "CERTSERVE_MODEL_DIR": str(tiny_registry),
        "CERTSERVE_TUNING_CACHE": str(tuning_cache),
        "CERTSERVE_DEVICE": "cpu",
        "CERTSERVE_PRECISION": "float32",
        "CERTSERVE_JOB_DB": str(folder / "jobs.sqlite3"),
        "CERTSERVE_SHUTDOWN_GRACE_S": str(GRACE_S),
        "CERTSERVE_BODY_READ_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    log_path = folder / "server.log"
    process, base = start_server(env, log_path)
    try:
        yield process, base, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_body_that_stalls_is_answered_408(server: tuple[subprocess.Popen, str, Path]) -> None:
    _, base, _ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"  # 999 bytes promised and never sent
        )
        started = time.monotonic()
        answer = s.recv(65536).decode()
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"detail"' in answer and "CERTSERVE_BODY_READ_TIMEOUT_S" in answer, answer
    assert waited < BODY_TIMEOUT_S + 5, waited


def test_requests_running_at_the_end_of_the_grace_get_a_json_503(server: tuple[subprocess.Popen, str, Path]) -> None:
    process, base, log_path = server
    image = encode_image(np.full((28, 28), 128, dtype=np.uint8))

    def long_certify() -> httpx.Response:  # about a minute of samples on the tiny model
        files = {"file": ("x.png", image, "image/png")}
        return httpx.post(f"{base}/v1/certify", files=files, data={"n": "400000", "seed": "1"}, timeout=60)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_certify)
        time.sleep(1.5)  # it is computing
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answer = running.result(timeout=GRACE_S + 10)
        answered_after = time.monotonic() - signalled
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/json" and "Retry-After" in answer.headers
    assert "shutting down" in answer.json()["detail"]
    assert answered_after < GRACE_S, answered_after  # before uvicorn's grace ends and it cancels the request
    code = process.wait(timeout=20)
    text = log_path.read_text()
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text and "Traceback" not in text, text
