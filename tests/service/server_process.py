"""``python -m service`` in a subprocess, serving the tiny model: for tests that need the real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start the server with ``env`` (CERTSERVE_* settings; a free port is added) and wait until it is ready.

    Returns the process and its base URL; stdout and stderr go to ``log_path``."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO,
            env={**os.environ, **env, "CERTSERVE_PORT": str(port)},
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process, log_path)
    return process, base


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
