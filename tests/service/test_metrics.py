"""Prometheus metrics: what each recording helper adds, read back from the default registry."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import REGISTRY

from service import metrics
from service.engine.engine import Timing
from service.engine.scheduler import Batch, Priority, Scheduler, WorkItem
from smoothing.core import Certificate, Prediction
from smoothing.sampling import Chunk


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def bucket_bounds(histogram_name: str) -> list[float]:
    """The finite upper bounds ("le") a histogram exports, read from the registry's own output."""
    bounds = {
        float(sample.labels["le"])
        for family in REGISTRY.collect()
        if family.name == histogram_name
        for sample in family.samples
        if sample.name == histogram_name + "_bucket"
    }
    return sorted(b for b in bounds if math.isfinite(b))


def work_item(model_id: str, num: int) -> WorkItem:
    return WorkItem(
        model_id=model_id,
        x=torch.zeros(1, 4, 4),
        sigma=0.25,
        key=0,
        stage=0,
        num=num,
        num_classes=10,
        priority=Priority.PREDICT,
    )


def certificate(label: int | None, radius: float) -> Certificate:
    return Certificate(
        label=label,
        radius=radius,
        p_a_lower=0.9 if label is not None else 0.4,
        top_class=2,
        selection_counts=(0, 0, 100),
        estimation_counts=(0, 10, 990),
        n0=100,
        n=1000,
        alpha=0.001,
        sigma=0.25,
    )


def prediction(label: int | None) -> Prediction:
    return Prediction(
        label=label, p_value=1e-9 if label is not None else 0.5, counts=(0, 5, 995), n=1000, alpha=0.001, sigma=0.25
    )


def test_record_batch_counts_samples_and_passes() -> None:
    model = "metrics-batch"
    a, b = work_item(model, 1024), work_item(model, 100)
    x = torch.zeros(1, 4, 4)
    chunks = [Chunk(x, 0.25, 0, 0, 0, 256), Chunk(x, 0.25, 0, 0, 256, 512), Chunk(x, 0.25, 1, 0, 0, 100)]
    batch = Batch(model, [a, a, b], chunks)
    assert batch.size == 612

    metrics.record_batch(batch, 0.02, executor="cuda:0")
    metrics.record_batch(Batch(model, [b], [Chunk(x, 0.25, 1, 0, 0, 1)]), 0.001, executor="cuda:0")
    metrics.record_batch(Batch(model, [b], [Chunk(x, 0.25, 1, 0, 1, 8)]), 0.5, executor="cuda:1")

    on = {"model": model, "executor": "cuda:0"}
    assert value("certserve_noise_samples_total", **on) == 613
    assert value("certserve_forward_passes_total", **on) == 2
    assert value("certserve_batch_samples_count", **on) == 2
    assert value("certserve_batch_samples_sum", **on) == 613
    # 612 samples land in the 1024 bucket, not in 512; the single sample in the first bucket.
    assert value("certserve_batch_samples_bucket", **on, le="512.0") == 1
    assert value("certserve_batch_samples_bucket", **on, le="1024.0") == 2
    assert value("certserve_batch_samples_bucket", **on, le="1.0") == 1
    assert value("certserve_forward_pass_seconds_sum", **on) == pytest.approx(0.021)
    # The other executor's pass is its own: samples/s and busy time are per executor.
    assert value("certserve_noise_samples_total", model=model, executor="cuda:1") == 7
    assert value("certserve_forward_pass_seconds_sum", model=model, executor="cuda:1") == pytest.approx(0.5)


def test_record_certificate_counts_abstentions_and_radius_of_the_rest() -> None:
    model = "metrics-certify"
    metrics.record_certificate(model, 2 == None, 0.7, 1.5, Timing(queued_s=0.25, compute_s=1.2))
    metrics.record_certificate(model, None is None, 0.0, 3.0, Timing(queued_s=0.5, compute_s=2.4))
    metrics.record_certificate(model, 2 == None, 0.7, 0.004, None)  # a cache hit: no queue wait

    assert value("certserve_certifications_total", model=model) == 3
    assert value("certserve_abstentions_total", endpoint="certify", model=model) == 1
    assert value("certserve_abstentions_total", endpoint="predict", model=model) == 0
    # The abstention's radius (0) is not observed: only the two certified ones.
    assert value("certserve_certified_radius_count", model=model) == 2
    assert value("certserve_certified_radius_sum", model=model) == pytest.approx(1.4)
    assert value("certserve_certified_radius_bucket", model=model, le="0.5") == 0
    assert value("certserve_certified_radius_bucket", model=model, le="0.75") == 2
    assert value("certserve_request_latency_seconds_count", endpoint="certify", model=model) == 3
    assert value("certserve_request_latency_seconds_sum", endpoint="certify", model=model) == pytest.approx(4.504)
    assert value("certserve_queue_wait_seconds_count", model=model) == 2
    assert value("certserve_queue_wait_seconds_sum", model=model) == pytest.approx(0.75)


def test_record_certificate_endpoint_label() -> None:
    model = "metrics-job"
    metrics.record_certificate(model, None is None, 0.0, 9.0, Timing(), endpoint="job")
    assert value("certserve_abstentions_total", endpoint="job", model=model) == 1
    assert value("certserve_abstentions_total", endpoint="certify", model=model) == 0
    assert value("certserve_request_latency_seconds_count", endpoint="job", model=model) == 1


def test_record_prediction() -> None:
    model = "metrics-predict"
    metrics.record_prediction(model, prediction(2), 0.05, Timing(queued_s=0.01, compute_s=0.04))
    metrics.record_prediction(model, prediction(None), 0.06, Timing(queued_s=0.02, compute_s=0.04))

    assert value("certserve_predictions_total", model=model) == 2
    assert value("certserve_abstentions_total", endpoint="predict", model=model) == 1
    assert value("certserve_certifications_total", model=model) == 0
    assert value("certserve_request_latency_seconds_count", endpoint="predict", model=model) == 2
    assert value("certserve_queue_wait_seconds_sum", model=model) == pytest.approx(0.03)
    assert value("certserve_certified_radius_count", model=model) == 0


def test_pending_samples_and_backlog_follow_the_scheduler() -> None:
    scheduler = Scheduler(max_pending_samples=10_000, expected_rates={"metrics-backlog-a": 500.0})
    metrics.track_scheduler(scheduler, ["metrics-backlog-a", "metrics-backlog-b"])
    assert value("certserve_pending_samples") == 0
    assert REGISTRY.get_sample_value("certserve_backlog_seconds", {"model": "metrics-backlog-b"}) == 0.0
    scheduler.submit(work_item("metrics-backlog-a", 3000))
    assert value("certserve_pending_samples") == 3000
    assert value("certserve_backlog_seconds", model="metrics-backlog-a") == pytest.approx(6.0)  # 3000 / 500 per s
    assert value("certserve_backlog_seconds", model="metrics-backlog-b") == 0.0
    batch = scheduler.next_batch(lambda _, interactive: 1000, timeout=0.0)
    scheduler.complete(batch, torch.zeros(len(batch.chunks), 10, dtype=torch.long), service_seconds=0.5)
    # 1000 samples counted at the first measured rate: 2000 samples/s, blended 9:1 with the expected 500.
    assert value("certserve_pending_samples") == 2000
    assert value("certserve_backlog_seconds", model="metrics-backlog-a") == pytest.approx(2000 / 650.0)


def test_forward_pass_failures_are_counted_per_model_and_executor() -> None:
    scheduler = Scheduler(max_pending_samples=10_000)
    item = work_item("metrics-failing", 100)
    scheduler.submit(item)
    batch = scheduler.next_batch(lambda _, interactive: 1000, timeout=0.0)
    metrics.record_forward_failure(batch, RuntimeError("CUDA error: an illegal memory access"), executor="cuda:0")
    assert value("certserve_forward_pass_failures_total", model="metrics-failing", executor="cuda:0") == 1


@pytest.mark.parametrize(
    ("code", "cause", "expected"),
    [
        (200, None, "ok"),
        (202, None, "ok"),
        (422, None, "client_error"),
        (404, None, "client_error"),
        (499, None, "client_disconnect"),
        (500, None, "server_error"),
        (503, "queue_full", "queue_full"),
        (504, "deadline", "deadline"),
    ],
)
def test_responses_are_counted_by_route_code_and_cause(code: int, cause: str | None, expected: str) -> None:
    route = f"/metrics-test/{code}/{cause}"
    metrics.record_response(route, code, cause)
    assert value("certserve_http_responses_total", route=route, code=str(code), cause=expected) == 1


@pytest.mark.parametrize("name", ["certserve_request_latency_seconds", "certserve_queue_wait_seconds"])
def test_duration_buckets_span_5ms_to_300s(name: str) -> None:
    metrics.record_prediction("metrics-buckets", prediction(1), 0.1, Timing())  # make the series exist
    bounds = bucket_bounds(name)
    assert bounds[0] == 0.005
    assert bounds[-1] == 300.0
    assert len(bounds) >= 10  # fine enough to read a p99 from


def test_batch_sample_buckets_are_powers_of_two() -> None:
    metrics.record_batch(Batch("metrics-buckets", [], [Chunk(torch.zeros(1), 0.25, 0, 0, 0, 8)]), 0.01, executor="cpu")
    assert bucket_bounds("certserve_batch_samples") == [float(2**k) for k in range(15)]


def test_cache_results_are_exported_from_the_start() -> None:
    for result in ("hit", "miss", "error"):
        assert REGISTRY.get_sample_value("certserve_cache_requests_total", {"result": result}) is not None


def test_jobs_gauge_by_state() -> None:
    metrics.JOBS.labels("running").set(2)
    assert value("certserve_jobs", state="running") == 2
