"""The real server for end-to-end tests: ``python -m service`` (uvicorn) in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(base: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready within {timeout_s} s:\n{log_path.read_text()}")


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """A server started with ``env`` added to this process's environment, once ready: its process and base URL.

    The caller stops it (``running_server`` does, and checks that it shut down cleanly)."""
    port = free_port()
    full_env = {**os.environ, **env, "CERTSERVE_PORT": str(port)}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=full_env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, log_path)
    except AssertionError:
        process.kill()
        raise
    return process, base


@contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """The base URL of a server started with ``env`` (CERTSERVE_* settings) added to this process's environment.

    On exit it is sent SIGTERM and must shut down cleanly within 20 s, with no traceback in its log.
    """
    process, base = start_server(env, log_path)
    try:
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    text = log_path.read_text()
    # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit status says SIGTERM.
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text and "Traceback" not in text, text
