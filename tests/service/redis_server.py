"""A redis-server of the test's own (ports 6390-6399), to kill, pause and restart without touching the shared one."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis


class RedisServer:
    """``redis-server`` on ``port`` with its files in ``folder``; ``persistent`` = AOF fsynced on every write.

    Without persistence a restart comes back empty, as a Redis with ``--save ""`` and no AOF does.
    """

    def __init__(self, port: int, folder: Path, *, persistent: bool) -> None:
        self.port = port
        self.folder = folder
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (make install puts it there as root)"
        self.folder.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "", *aof],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                assert self.process.poll() is None, f"redis-server on port {self.port} exited"
                assert time.monotonic() < deadline, f"redis-server on port {self.port} did not start"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: nothing is flushed beyond what the AOF already holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)
