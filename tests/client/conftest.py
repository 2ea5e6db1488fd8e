"""The client's tests run it against the real server: ``python -m service`` in a subprocess, serving the
tiny model of the service tests, with its jobs and certificates in the real Redis (database 6).

Servers: ``server`` (API keys and a signing key configured, default limits), ``tight_server`` (a small queue bound, to
meet 503) and ``deadline_server`` (a short request deadline, to meet 504).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.signing import new_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # the service tests' helpers
from client_helpers import API_KEY, OTHER_KEY, SHORT_TIMEOUT_S, TIGHT_PENDING_SAMPLES  # noqa: E402
from live_server import running_server  # noqa: E402
from tiny_model import save_tiny_registry, save_tuning_answer  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/6"


@pytest.fixture(scope="session")
def registry_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings serving the tiny model on the CPU in float32."""
    registry = save_tiny_registry(tmp_path_factory.mktemp("registry"))
    tuning = save_tuning_answer(registry, tmp_path_factory.mktemp("tuning") / "tuning.json")
    return {
        "CERTSERVE_MODEL_DIR": str(registry),
        "CERTSERVE_TUNING_CACHE": str(tuning),
        "CERTSERVE_DEVICE": "cpu",
        "CERTSERVE_PRECISION": "float32",
    }


@pytest.fixture(scope="session")
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def signing_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signing") / "signing.pem"
    new_key(path)
    return path


@pytest.fixture(scope="session")
def server(
    registry_env: dict[str, str],
    redis_db: redis.Redis,
    signing_key_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    env = {
        **registry_env,
        "CERTSERVE_SIGNING_KEY_FILE": str(signing_key_file),
        "CERTSERVE_REDIS_URL": REDIS_URL,
        "CERTSERVE_API_KEYS": f'["{API_KEY}", "{OTHER_KEY}"]',
        "CERTSERVE_MAX_BODY_BYTES": "200000",
        "CERTSERVE_BATCH_DELAY_MS": "5",
    }
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


def service_without_redis(registry_env: dict[str, str], folder: Path, **settings: str) -> dict[str, str]:
    """Settings of a server keeping its jobs in SQLite in ``folder``; ``settings``: CERTSERVE_<NAME> values."""
    extra = {f"CERTSERVE_{name.upper()}": value for name, value in settings.items()}
    return {**registry_env, "CERTSERVE_JOB_DB": str(folder / "jobs.sqlite3"), **extra}


@pytest.fixture(scope="session")
def tight_server(registry_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("tight")
    env = service_without_redis(registry_env, folder, max_pending_samples=str(TIGHT_PENDING_SAMPLES))
    with running_server(env, folder / "server.log") as base:
        yield base


@pytest.fixture(scope="session")
def deadline_server(registry_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("deadline")
    env = service_without_redis(registry_env, folder, request_timeout_s=str(SHORT_TIMEOUT_S))
    with running_server(env, folder / "server.log") as base:
        yield base
