"""Smoke test of the benchmark: ``python -m bench --quick`` runs end to end and writes its results and report.

It runs against a tiny untrained checkpoint in a temporary registry, on the CPU. No timing is
asserted (the quick sizes measure nothing); what is checked is that every part ran and recorded
what it should: every K, every sweep point, every request of the mixed load, cache hits that
really came from the cache, and a report with every section.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import QUICK
from bench.report import SECTIONS
from models.architectures import build_model
from models.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow  # about a minute: two server starts and every part of the benchmark

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-bench"
REDIS_URL = "redis://127.0.0.1:6379/11"  # not 12, the full benchmark's: a run beside the tests stays intact


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with one untrained fmnist_resnet checkpoint (1×28×28, 10 classes, σ = 0.25)."""
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    save_checkpoint(
        build_model("fmnist_resnet", 10, (0.286,), (0.353,)).eval(),
        root / MODEL_ID,
        id=MODEL_ID,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=[f"class {i}" for i in range(10)],
        input_shape=(1, 28, 28),
        sigma=0.25,
        normalization={"mean": [0.286], "std": [0.353]},
    )
    return root


@pytest.fixture(scope="module")
def quick_run(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out_dir = tmp_path_factory.mktemp("bench")
    out, report = out_dir / "results" / "cpu.json", out_dir / "BENCHMARKS.md"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--model",
        MODEL_ID,
        "--model-dir",
        str(registry),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--report",
        str(report),
        "--redis-url",
        REDIS_URL,
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads(out.read_text()), report.read_text()


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_results_hold_every_part(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    assert results["quick"] is True
    assert results["model"]["id"] == MODEL_ID
    assert results["machine"]["cpu_model"] and results["machine"]["torch_threads"] >= 1
    limit = results["limit"]
    assert positive(limit["samples_per_s"]) and positive(limit["samples_per_s_float32"])
    assert limit["model_as_measured"]["batch_size"] in QUICK.batch_candidates
    assert [p["dtype"] for p in limit["precisions"]] == ["bfloat16"]  # the CPU's one reduced precision
    assert positive(results["library"]["fraction_of_limit"])
    assert results["library"]["certifications"] >= 1


def test_service_ran_every_load(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    loads = results["service"]["loads"]
    assert [load["clients"] for load in loads] == list(QUICK.service_ks)
    for load in loads:
        assert positive(load["samples_per_s"]) and positive(load["fraction_of_limit"])
        assert load["errors"] == {}
    memory = results["memory"]
    assert memory["clients"] == max(QUICK.service_ks)
    assert memory["samples"] >= 3 and positive(memory["peak_mib"]) and memory["peak_mib"] >= memory["max_mib"]


def test_latency_mixed_load_and_cache(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    latency = results["latency"]
    assert latency["idle"]["count"] == QUICK.idle_predicts
    assert latency["saturated"]["predict"]["count"] == QUICK.saturated_predicts
    assert [p["clients"] for p in latency["sweep"]] == list(QUICK.sweep_concurrency)
    assert latency["knee_clients"] in QUICK.sweep_concurrency
    mixed = results["mixed_load"]
    for run in (mixed["paper_server"], mixed["service"]):
        assert run["predict_latency"]["count"] == QUICK.mixed_predicts
        assert run["certify_latency"]["count"] == len(QUICK.mixed_certify_ns)
        assert run["samples"] == mixed["load"]["samples"] and run["errors"] == {}
    assert positive(mixed["throughput_speedup"]) and positive(mixed["attainable_speedup"])
    assert len(mixed["limit_samples_per_s"]) == len(mixed["paper_loop_samples_per_s"]) == QUICK.mixed_rounds + 1
    assert mixed["fraction_of_attainable"] == mixed["throughput_speedup"] / mixed["attainable_speedup"]
    cost = results["client_cost"]
    assert positive(cost["loadgen_cpu_ms_per_request"]) and positive(cost["httpx_cpu_ms_per_request"])
    in_process = results["cache"]["in_process"]
    assert in_process["first_request_cached"] is False and in_process["repeats_not_cached"] == 0
    redis_part = results["cache"]["redis"]
    assert "unavailable" in redis_part or redis_part["repeats_not_cached"] == 0


def test_report_has_every_section(quick_run: tuple[dict, str]) -> None:
    results, report = quick_run
    for title, _ in SECTIONS:
        assert f"### {title}" in report
    assert MODEL_ID in report and "Quick run" in report
    for row in results["headlines"]:
        assert row["name"] in report
