"""The compose stack without Docker: its processes on loopback, scraped by Debian's Prometheus.

Started from docker-compose.yml itself: the two redis-servers with their compose command lines, the API
with its compose command and environment, the workers (when ``service/jobs/worker.py`` exists: two of
them, with the workers service's command and environment), and ``prometheus`` with the repository's
config and alert rules. Only addresses are rewritten (loopback ports, a temporary data folder), plus
what the tests serve (the tiny model) and the scrape and evaluation intervals (1 s). Then a job, a
prediction, a certificate and a bad request go through the API, and Prometheus' HTTP API must show the
scraped series, the evaluated rules, every dashboard and rule query answered, every metric they name
present (docker/allowlist.yml names what a CPU host without workers cannot show), and an alert going
pending when the cache Redis is killed.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import httpx
import numpy as np
import pytest
import yaml
from ops_files import (
    ALERTS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    REPO,
    WORKER_MODULE,
    allowlist,
    compose,
    dashboard_queries,
    load_yaml,
    rule_expressions,
    used_metric_names,
)
from payloads import encode_image

pytestmark = pytest.mark.slow  # several processes start; about half a minute

REDIS_PORTS = range(6380, 6390)  # this test's own redis-servers
WORKERS = 2 if (REPO / WORKER_MODULE.replace(".", "/")).with_suffix(".py").is_file() else 0
INTERVAL = "1s"


def free_port(candidates: range | None = None) -> int:
    for port in candidates or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {candidates}")


def wait_for(what: str, check: Callable[[], Any], processes: list[Process], timeout_s: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        for process in processes:
            process.assert_running()
        try:
            last = check()
            if last:
                return last
        except (OSError, httpx.TransportError, KeyError, IndexError, ValueError) as e:
            last = e
        time.sleep(0.25)
    logs = "\n".join(p.tail() for p in processes)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})\n{logs}")


@dataclass
class Process:
    name: str
    command: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> Process:
        with self.log.open("w") as log:
            self.popen = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=log)
        return self

    def assert_running(self) -> None:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def redis_address(url: str, port: int) -> str:
    """The compose's Redis URL with its host and port moved to loopback (database kept)."""
    parts = urlparse(url)
    return urlunparse(parts._replace(netloc=f"127.0.0.1:{port}"))


def certserve_env(service: dict[str, Any], redis_ports: dict[str, int], overrides: dict[str, str]) -> dict[str, str]:
    """A compose service's environment with the Redis hosts moved to loopback, then ``overrides``."""
    env = {k: str(v) for k, v in service["environment"].items()}
    for variable, value in env.items():
        if value.startswith("redis://"):
            env[variable] = redis_address(value, redis_ports[urlparse(value).hostname])
    return {**os.environ, **env, **overrides}


def prometheus_config(api_port: int, worker_ports: list[int], prometheus_port: int) -> dict[str, Any]:
    """The repository's Prometheus config with loopback targets, 1 s intervals and an absolute rules path."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"] |= {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    targets = {
        "certserve-api": [f"127.0.0.1:{api_port}"],
        "certserve-workers": [f"127.0.0.1:{p}" for p in worker_ports],
        "prometheus": [f"127.0.0.1:{prometheus_port}"],
    }
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@dataclass
class Stack:
    api: str
    prometheus: str
    processes: list[Process]
    redis: dict[str, Process]
    worker_ports: list[int]

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def stack(tiny_registry: Path, tuning_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_binary = shutil.which("prometheus")
    assert prometheus_binary, (
        "prometheus is missing: `make prometheus` installs Debian's (sudo apt-get install prometheus)"
    )
    tmp = tmp_path_factory.mktemp("stack")
    services = compose()["services"]
    processes: list[Process] = []
    try:
        redis_ports = {}
        redis_processes = {}
        for name in ("redis", "cache"):
            port = redis_ports[name] = free_port(REDIS_PORTS)
            folder = tmp / name
            folder.mkdir()
            command = [*services[name]["command"], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
            redis_processes[name] = Process(name, command, tmp / f"{name}.log").start()
            processes.append(redis_processes[name])
            wait_for(
                f"{name} answers",
                lambda p=port: socket.create_connection(("127.0.0.1", p), 1).close() or True,
                processes,
            )

        served = {
            "CERTSERVE_MODEL_DIR": str(tiny_registry),
            "CERTSERVE_TUNING_CACHE": str(tuning_cache),
            "CERTSERVE_DEVICE": "cpu",
            "CERTSERVE_PRECISION": "float32",
            "CERTSERVE_THREADS": "1",
            "CERTSERVE_JOB_DB": str(tmp / "jobs.sqlite3"),
        }
        api_port = free_port()
        api_env = certserve_env(
            services["api-cpu"], redis_ports, {**served, "CERTSERVE_HOST": "127.0.0.1", "CERTSERVE_PORT": str(api_port)}
        )
        api = Process("api", [sys.executable, *services["api-cpu"]["command"][1:]], tmp / "api.log", api_env).start()
        processes.append(api)

        worker_ports = [free_port() for _ in range(WORKERS)]
        for i, port in enumerate(worker_ports):
            env = certserve_env(
                services["workers-cpu"], redis_ports, {**served, "CERTSERVE_WORKER_METRICS_PORT": str(port)}
            )
            command = [sys.executable, *services["workers-cpu"]["command"][1:]]
            processes.append(Process(f"worker-{i}", command, tmp / f"worker-{i}.log", env).start())

        prometheus_port = free_port()
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(prometheus_config(api_port, worker_ports, prometheus_port)))
        command = [
            prometheus_binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
        processes.append(Process("prometheus", command, tmp / "prometheus.log").start())

        base = f"http://127.0.0.1:{api_port}"
        wait_for("the API is ready", lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, processes)
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        wait_for(
            "Prometheus is ready", lambda: httpx.get(f"{prometheus}/-/ready", timeout=2).status_code == 200, processes
        )
        yield Stack(base, prometheus, processes, redis_processes, worker_ports)
    finally:
        for process in reversed(processes):
            process.stop()


def png(seed: int) -> dict[str, Any]:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return {"file": ("x.png", encode_image(pixels), "image/png")}


def npz(count: int) -> dict[str, Any]:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.random.default_rng(1).integers(0, 256, (count, 28, 28), dtype=np.uint8))
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def test_prometheus_scrapes_the_stack_and_evaluates_the_rules(stack: Stack) -> None:
    api, processes = stack.api, stack.processes
    assert httpx.post(f"{api}/v1/predict", files=png(0), data={"n": "200"}, timeout=60).status_code == 200
    assert httpx.post(f"{api}/v1/certify", files=png(1), data={"n0": "32", "n": "256"}, timeout=60).status_code == 200
    assert httpx.post(f"{api}/v1/predict", files=png(2), data={"n": "-5"}, timeout=60).status_code == 422
    created = httpx.post(f"{api}/v1/jobs", files=npz(3), data={"n0": "16", "n": "128"}, timeout=60)
    assert created.status_code == 202, created.text
    job = f"{api}/v1/jobs/{created.json()['id']}"
    wait_for("the job is done", lambda: httpx.get(job, timeout=5).json()["state"] == "done", processes)

    # Every target is up: the API and, where they exist, the workers.
    def targets() -> list[dict[str, Any]]:
        active = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return active if active and all(t["health"] == "up" for t in active) else []

    by_job: dict[str, int] = {}
    for target in wait_for("every target is up", targets, processes):
        by_job[target["labels"]["job"]] = by_job.get(target["labels"]["job"], 0) + 1
    assert by_job == {"certserve-api": 1, "prometheus": 1, **({"certserve-workers": WORKERS} if WORKERS else {})}

    # The job's three images and the bad request, as Prometheus scraped them.
    def job_images() -> float:
        result = stack.query('sum(certserve_request_latency_seconds_count{endpoint="job"})')
        return float(result[0]["value"][1]) if result else 0.0

    assert wait_for("the job's images are scraped", lambda: job_images() >= 3, processes)
    bad = wait_for(
        "the 422 is scraped",
        lambda: stack.query('certserve_http_responses_total{route="/v1/predict", code="422", cause="client_error"}'),
        processes,
    )
    assert float(bad[0]["value"][1]) >= 1
    assert stack.query('certserve_redis_up{role="jobs"} == 1') and stack.query('certserve_redis_up{role="cache"} == 1')

    # The rules were loaded from the repository's file and evaluated without error.
    def evaluated_groups() -> list[dict[str, Any]]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules) else []

    groups = wait_for("the rules are evaluated", evaluated_groups, processes)
    rules = [r for g in groups for r in g["rules"]]
    assert {g["file"] for g in groups} == {str(ALERTS)}
    assert {r["name"] for r in rules} == set(rule_expressions())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    # Every query of the dashboard and of the rules runs, and every metric they name was scraped.
    for expr in dashboard_queries() + list(rule_expressions().values()):
        stack.query(expr)
    scraped = set(httpx.get(f"{stack.prometheus}/api/v1/label/__name__/values", timeout=5).json()["data"])
    listed = allowlist()["metrics"]
    not_live_here = set(listed["cuda"]) | (set() if WORKERS else set(listed["workers"]))
    missing = used_metric_names() - scraped - not_live_here - PROMETHEUS_SERIES
    assert not missing, f"named by the dashboard or the rules, never scraped: {sorted(missing)}"


def test_killing_the_cache_redis_raises_its_alert(stack: Stack) -> None:
    stack.redis["cache"].stop()

    def cache_alert() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "CertserveRedisUnreachable" and a["labels"]["role"] == "cache"
        ]

    live = [p for p in stack.processes if p.name != "cache"]
    (alert,) = wait_for("CertserveRedisUnreachable goes pending", cache_alert, live, timeout_s=30)
    assert alert["state"] in ("pending", "firing") and alert["labels"]["job"] == "certserve-api"
    # The API still answers without its cache.
    assert (
        httpx.post(f"{stack.api}/v1/certify", files=png(9), data={"n0": "16", "n": "64"}, timeout=60).status_code == 200
    )
