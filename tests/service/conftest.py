"""Shared fixtures of the service tests: a tiny untrained model in a temporary registry.

The model is ``fmnist_resnet`` with fixed random weights: its answers mean nothing, but every
code path (decoding, batching, counting, statistics, caching) runs on it as on a trained one.
``tuning_cache`` stores its batch-size sweep answer (TINY_BATCH samples per forward pass), so
that apps start in milliseconds and batch the same way in every test (a plan swept over one size
is pinned: neither re-validated at start nor refined while serving).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_model import TINY_ID, save_tiny_registry, save_tuning_answer

from service.settings import Settings


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry folder holding one checkpoint, id "tiny" (1×28×28, 10 classes, σ = 0.25)."""
    return save_tiny_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def tuning_cache(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuning-cache file answering the tiny model's batch-size sweep with TINY_BATCH (save_tuning_answer)."""
    return save_tuning_answer(tiny_registry, tmp_path_factory.mktemp("tuning") / "tuning.json")


@pytest.fixture(scope="session")
def make_settings(
    tiny_registry: Path, tuning_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """Settings serving the tiny model on the CPU, with a fresh job database; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "model_dir": tiny_registry,
            "models": [TINY_ID],
            "devices": "cpu",
            "tuning_cache": tuning_cache,
            "job_db": tmp_path_factory.mktemp("jobs") / "jobs.sqlite3",
            "redis_url": None,
            "precision": "float32",
            "api_keys": [],
        }
        return Settings(**{**fields, **overrides})

    return make
