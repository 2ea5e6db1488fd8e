"""Shared fixtures of the service tests: a tiny untrained model in a temporary registry.

The model is ``fmnist_resnet`` with fixed random weights: its answers mean nothing, but every
code path (decoding, batching, counting, statistics, caching) runs on it as on a trained one.
``tuning_cache`` stores its batch-size sweep answer (TINY_BATCH samples per forward pass), so
that apps start in milliseconds and batch the same way in every test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_model import TINY_BATCH, TINY_CLASSES, TINY_ID, TINY_SHAPE, TINY_SIGMA, spread_predictions

from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.registry import load_model
from service.engine.pool import cpu_cores
from service.settings import Settings
from smoothing.tuning import prepare_for_inference


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry folder holding one checkpoint, id "tiny" (1×28×28, 10 classes, σ = 0.25)."""
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)  # the same weights in every run
    model = build_model("fmnist_resnet", len(TINY_CLASSES), (0.286,), (0.353,)).eval()
    spread_predictions(model)
    save_checkpoint(
        model,
        root / TINY_ID,
        id=TINY_ID,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=TINY_CLASSES,
        input_shape=TINY_SHAPE,
        sigma=TINY_SIGMA,
        normalization={"mean": [0.286], "std": [0.353]},
    )
    return root


@pytest.fixture(scope="session")
def tuning_cache(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuning-cache file answering the tiny model's batch-size sweep with TINY_BATCH, at 1 and 2 threads
    (plans are cached per thread count: one CPU executor with both cores, or two with one each)."""
    path = tmp_path_factory.mktemp("tuning") / "tuning.json"
    model, manifest = load_model(tiny_registry, TINY_ID)
    threads = torch.get_num_threads()
    for count in sorted({1, 2, cpu_cores()}):
        torch.set_num_threads(count)
        prepare_for_inference(
            model, manifest.input_shape, "cpu", cache_key=manifest.sha256, cache_file=path, candidates=(TINY_BATCH,)
        )
    torch.set_num_threads(threads)
    return path


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
