"""Prometheus metrics of the service: one prefix (``certserve_``), base units (seconds, samples).

Every object lives on prometheus_client's default registry, which ``/metrics`` exposes. The
per-model counters are paired so that a rate is one PromQL division, e.g. the abstention rate
of certify: ``rate(certserve_abstentions_total{endpoint="certify"}[5m]) /
rate(certserve_certifications_total[5m])``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.engine.engine import Timing
    from service.engine.scheduler import Batch, Scheduler
    from smoothing.core import Certificate, Prediction

# 5 ms .. 300 s, roughly ×2–2.5 per step: covers a cached answer as well as a 100,000-sample certification on a CPU.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
# Powers of two, 1 .. 16384 samples: batch sizes are tuned to powers of two.
SAMPLE_BUCKETS = tuple(float(2**k) for k in range(15))
# ℓ2 radii in [0, 1] pixel space; the paper's σ ≤ 1 models certify up to about 4.
RADIUS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)

REQUEST_LATENCY = Histogram(
    "certserve_request_latency_seconds",
    "time from a request's arrival to its answer, per endpoint and model",
    ["endpoint", "model"],
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "certserve_queue_wait_seconds",
    "time a request's samples waited before their first forward pass (summed over its phases)",
    ["model"],
    buckets=DURATION_BUCKETS,
)
FORWARD_PASS_LATENCY = Histogram(
    "certserve_forward_pass_seconds",
    "device time of one forward pass (noise, forward, argmax, counting)",
    ["model"],
    buckets=DURATION_BUCKETS,
)
BATCH_SAMPLES = Histogram(
    "certserve_batch_samples", "noise samples per forward pass", ["model"], buckets=SAMPLE_BUCKETS
)
NOISE_SAMPLES = Counter("certserve_noise_samples", "noise samples classified", ["model"])
FORWARD_PASSES = Counter("certserve_forward_passes", "forward passes run", ["model"])
PENDING_SAMPLES = Gauge("certserve_pending_samples", "noise samples queued or in flight, not yet counted")
PREDICTIONS = Counter("certserve_predictions", "PREDICT answers given (cache hits included)", ["model"])
CERTIFICATIONS = Counter("certserve_certifications", "CERTIFY answers given (cache hits included)", ["model"])
ABSTENTIONS = Counter("certserve_abstentions", "answers that abstained, per endpoint and model", ["endpoint", "model"])
CERTIFIED_RADIUS = Histogram(
    "certserve_certified_radius",
    "certified l2 radius of non-abstaining certificates",
    ["model"],
    buckets=RADIUS_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "certserve_cache_requests", "certificate cache lookups and stores by result (hit, miss, error)", ["result"]
)
JOBS = Gauge("certserve_jobs", "batch jobs by state", ["state"])
SAMPLES_PER_CERTIFICATION = Histogram(
    "certserve_certification_samples",
    "noise samples spent per computed certification (selection + estimation), by mode",
    ["mode"],
    buckets=sorted([10**k for k in range(1, 7)] + [3 * 10**k for k in range(1, 6)]),
)

# Export the cache series at 0 from the start, so that rate() sees the first hit, miss or error.
for _result in ("hit", "miss", "error"):
    CACHE_REQUESTS.labels(_result)


def record_batch(batch: Batch, seconds: float) -> None:
    """The executor's ``on_batch`` hook: one forward pass of ``batch.size`` samples took ``seconds``."""
    model_id = batch.model_id
    BATCH_SAMPLES.labels(model_id).observe(batch.size)
    NOISE_SAMPLES.labels(model_id).inc(batch.size)
    FORWARD_PASSES.labels(model_id).inc()
    FORWARD_PASS_LATENCY.labels(model_id).observe(seconds)


def track_pending(scheduler: Scheduler) -> None:
    """Make PENDING_SAMPLES read the scheduler's pending-sample count at every scrape."""
    PENDING_SAMPLES.set_function(lambda: scheduler.pending_samples)


def record_prediction(model_id: str, prediction: Prediction, latency_s: float, timing: Timing | None) -> None:
    """Count one PREDICT answer. ``timing`` None = answered without the device (no queue wait to record)."""
    REQUEST_LATENCY.labels("predict", model_id).observe(latency_s)
    if timing is not None:
        QUEUE_WAIT.labels(model_id).observe(timing.queued_s)
    PREDICTIONS.labels(model_id).inc()
    if prediction.abstained:
        ABSTENTIONS.labels("predict", model_id).inc()


def record_certificate(
    model_id: str, certificate: Certificate, latency_s: float, timing: Timing | None, endpoint: str = "certify"
) -> None:
    """Count one CERTIFY answer; its radius goes to CERTIFIED_RADIUS only if it did not abstain.

    ``timing`` None = a cache hit (no queue wait to record). ``endpoint`` labels latency and
    abstentions, e.g. "certify" or "job".
    """
    REQUEST_LATENCY.labels(endpoint, model_id).observe(latency_s)
    if timing is not None:
        QUEUE_WAIT.labels(model_id).observe(timing.queued_s)
    CERTIFICATIONS.labels(model_id).inc()
    if certificate.abstained:
        ABSTENTIONS.labels(endpoint, model_id).inc()
    else:
        CERTIFIED_RADIUS.labels(model_id).observe(certificate.radius)


def record_samples(mode: str, samples: int) -> None:
    """Samples one computed certification spent (cache hits spend none and are not recorded)."""
    SAMPLES_PER_CERTIFICATION.labels(mode).observe(samples)
