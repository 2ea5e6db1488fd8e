"""bench.gpu_checks on the CPU: the random-weights model loads from its registry folder and a CERTIFY is timed."""

from __future__ import annotations

from pathlib import Path

from bench.config import BRIEF, FULL
from bench.gpu_checks import check, make_random_model
from models.registry import load_model
from service.engine.models import pick_device


def test_a_random_model_is_a_registry_entry_and_its_certify_is_timed(tmp_path: Path) -> None:
    model_id = make_random_model(tmp_path, "cifar_resnet20")
    _, manifest = load_model(tmp_path, model_id)  # the sha256 in its manifest matches its weights
    assert manifest.input_shape == (3, 32, 32) and manifest.num_classes == 10
    result = check(tmp_path, model_id, pick_device("cpu"), n=300, repeats=2)
    assert result["device"] == "cpu" and "syncs_per_batch" not in result  # the sync count needs CUDA
    assert len(result["certify"]["seconds"]) == 2 and result["certify"]["samples_per_s"] > 0


def test_the_brief_run_keeps_the_full_request_sizes() -> None:
    sizes = ("n0", "certify_n", "predict_n", "service_ks", "mixed_predicts", "mixed_certify_ns", "cache_n")
    assert all(getattr(BRIEF, s) == getattr(FULL, s) for s in sizes)
    assert BRIEF.service_window_s < FULL.service_window_s and BRIEF.memory_s < FULL.memory_s
