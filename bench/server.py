"""The servers as subprocesses: ``python -m service`` configured through CERTSERVE_* variables, and the paper's
loop behind HTTP (``python -m bench.paper_server``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark dies, so no server outlives it."""
    with contextlib.suppress(OSError):  # not glibc: the finally-blocks of the benchmark still stop the server
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def server_env(
    *,
    model_dir: Path,
    model_id: str,
    device: torch.device | str,  # CERTSERVE_DEVICES: a device, or "auto"
    port: int,
    tuning_cache: Path,
    job_db: Path,
    redis_url: str | None,
    precision: str = "float32",
) -> dict[str, str]:
    """The environment of a service serving one model; every other CERTSERVE_* variable is removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}
    env.update(
        {
            "CERTSERVE_HOST": "127.0.0.1",
            "CERTSERVE_PORT": str(port),
            "CERTSERVE_MODEL_DIR": str(model_dir),
            "CERTSERVE_MODELS": f'["{model_id}"]',
            "CERTSERVE_DEVICES": str(device),
            "CERTSERVE_TUNING_CACHE": str(tuning_cache),  # the plan L was measured with: same batch, same format
            "CERTSERVE_PRECISION": precision,  # and the same arithmetic
            "CERTSERVE_JOB_DB": str(job_db),
            "CERTSERVE_SHUTDOWN_GRACE_S": "5",
        }
    )
    if redis_url:
        env["CERTSERVE_REDIS_URL"] = redis_url
    return env


def start_server(
    *,
    model_dir: Path,
    model_id: str,
    device: torch.device | str,
    tuning_cache: Path,
    workdir: Path,
    redis_url: str | None = None,
    timeout_s: float = 120.0,
    precision: str = "float32",
) -> Server:
    """Start the service and wait until /readyz answers 200; RuntimeError with its log's tail if it does not."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    name = "service-redis" if redis_url else "service"
    log_path = workdir / f"{name}-{port}.log"
    env = server_env(
        model_dir=model_dir,
        model_id=model_id,
        device=device,
        port=port,
        tuning_cache=tuning_cache,
        job_db=workdir / f"jobs-{port}.sqlite3",
        redis_url=redis_url,
        precision=precision,
    )
    return launch([sys.executable, "-m", "service"], env, log_path, port, "/readyz", timeout_s)


def start_paper_server(
    *, model_dir: Path, model_id: str, device: torch.device, workdir: Path, timeout_s: float = 120.0
) -> Server:
    """Start the paper's loop behind HTTP (``python -m bench.paper_server``) and wait until it answers /healthz."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}
    argv = [sys.executable, "-m", "bench.paper_server", "--model-dir", str(model_dir), "--model", model_id]
    argv += ["--device", str(device), "--port", str(port)]
    return launch(argv, env, workdir / f"paper-server-{port}.log", port, "/healthz", timeout_s)


def launch(argv: list[str], env: dict[str, str], log_path: Path, port: int, ready: str, timeout_s: float) -> Server:
    """Run ``argv`` and wait until GET ``ready`` answers 200 on ``port``; RuntimeError with its log's tail if not."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[2]} exited with {process.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(server.url + ready, timeout=2.0, trust_env=False).status_code == 200:
                return server
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"{argv[2]} was not ready within {timeout_s:g} s:\n{log_tail(log_path)}")


def stop_server(server: Server, timeout_s: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; returns its exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
