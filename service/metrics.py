"""Prometheus metrics of the service: one prefix (``certserve_``), base units (seconds, samples, bytes).

Every object lives on prometheus_client's default registry, which ``/metrics`` exposes. Labels
are of low cardinality: endpoint (predict, certify, job), route (a route template), model id,
executor (its device), cause, state, backend, role; never a job id, a seed or an input digest.
Counters are paired so that a rate is one PromQL division, e.g. the abstention rate per
endpoint and model: ``rate(certserve_abstentions_total[5m]) /
rate(certserve_request_latency_seconds_count[5m])`` (every answer is counted in the latency).
A device's busy fraction is ``rate(certserve_forward_pass_seconds_sum[1m])`` per executor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.engine.engine import Timing
    from service.engine.models import LoadedModel
    from service.engine.scheduler import Batch, Scheduler
    from smoothing.core import Prediction

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; nobody reads it
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
# Per forward pass, by model and by executor (named after its device): samples/s, busy time, batch size.
FORWARD_PASS_LATENCY = Histogram(
    "certserve_forward_pass_seconds",
    "device time of one forward pass (noise, forward, argmax, counting); its _sum's rate is the busy fraction",
    ["model", "executor"],
    buckets=DURATION_BUCKETS,
)
BATCH_SAMPLES = Histogram(
    "certserve_batch_samples", "noise samples per forward pass", ["model", "executor"], buckets=SAMPLE_BUCKETS
)
NOISE_SAMPLES = Counter("certserve_noise_samples", "noise samples classified", ["model", "executor"])
FORWARD_PASSES = Counter("certserve_forward_passes", "forward passes run", ["model", "executor"])
FORWARD_PASS_FAILURES = Counter(
    "certserve_forward_pass_failures", "forward passes that raised (their requests failed)", ["model", "executor"]
)
MEASURED_LIMIT = Gauge(
    "certserve_measured_limit_samples_per_second",
    "samples per second the model reached at its batch size when it was loaded (the tuner's sweep)",
    ["model", "executor"],
)
BATCH_SIZE = Gauge(
    "certserve_batch_size_samples",
    "the model's throughput batch size on the executor now: the plan's, moved by run-time refinement",
    ["model", "executor"],
)
PENDING_SAMPLES = Gauge("certserve_pending_samples", "noise samples queued or in flight, not yet counted")
BACKLOG = Gauge(
    "certserve_backlog_seconds",
    "seconds of forward passes the model's pending samples need at its recent rate (an autoscaling signal)",
    ["model"],
)
HTTP_RESPONSES = Counter(
    "certserve_http_responses",
    "HTTP responses by route (its template), status code and cause: ok, client_error, queue_full, deadline, "
    "store_unreachable, server_error, client_disconnect (code 499: the client left before the answer)",
    ["route", "code", "cause"],
)
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
JOBS = Gauge("certserve_jobs", "batch jobs by state, read from the job store (every process's jobs)", ["state"])
JOB_BACKLOG = Gauge(
    "certserve_job_backlog_images",
    "images of queued or running jobs without a result yet, by the job backend that runs them",
    ["backend"],
)
REDIS_UP = Gauge(
    "certserve_redis_up",
    "1 if the Redis answered at the last scrape (cache: a ping; jobs: the job counts), else 0, by role",
    ["role"],
)
SAMPLES_PER_CERTIFICATION = Histogram(
    "certserve_certification_samples",
    "noise samples spent per computed certification (selection + estimation), by mode",
    ["mode"],
    buckets=sorted([10**k for k in range(1, 7)] + [3 * 10**k for k in range(1, 6)]),
)

# Export the cache series at 0 from the start, so that rate() sees the first hit, miss or error.
for _result in ("hit", "miss", "error"):
    CACHE_REQUESTS.labels(_result)


def record_batch(batch: Batch, seconds: float, *, executor: str) -> None:
    """The executor's ``on_batch`` hook: one forward pass of ``batch.size`` samples took ``seconds``."""
    labels = (batch.model_id, executor)
    BATCH_SAMPLES.labels(*labels).observe(batch.size)
    NOISE_SAMPLES.labels(*labels).inc(batch.size)
    FORWARD_PASSES.labels(*labels).inc()
    FORWARD_PASS_LATENCY.labels(*labels).observe(seconds)


def record_forward_failure(batch: Batch, error: BaseException, *, executor: str) -> None:
    """The executor's ``on_failure`` hook: a forward pass of ``batch`` raised ``error``."""
    FORWARD_PASS_FAILURES.labels(batch.model_id, executor).inc()


def track_executor(executor: str, models: dict[str, LoadedModel]) -> None:
    """Export each model's measured limit and batch size on ``executor``, and its per-pass counters at 0."""
    for model_id, loaded in models.items():
        MEASURED_LIMIT.labels(model_id, executor).set(loaded.plan.samples_per_second)
        BATCH_SIZE.labels(model_id, executor).set(loaded.plan.batch_size)
        for counter in (NOISE_SAMPLES, FORWARD_PASSES, FORWARD_PASS_FAILURES):
            counter.labels(model_id, executor)


def record_batch_size(model_id: str, executor: str, batch_size: int) -> None:
    """Run-time refinement moved ``model_id``'s throughput batch size on ``executor`` to ``batch_size`` samples."""
    BATCH_SIZE.labels(model_id, executor).set(batch_size)


def track_scheduler(scheduler: Scheduler, model_ids: Iterable[str]) -> None:
    """Make PENDING_SAMPLES and each model's BACKLOG read the scheduler at every scrape."""
    PENDING_SAMPLES.set_function(lambda: scheduler.pending_samples)
    for model_id in model_ids:
        BACKLOG.labels(model_id).set_function(lambda m=model_id: scheduler.backlog_seconds().get(m, 0.0))


def record_response(route: str, code: int, cause: str | None) -> None:
    """Count one HTTP response; ``cause`` None = the one its status implies (ok, client_error, server_error)."""
    if cause is None:
        if code == CLIENT_CLOSED_REQUEST:
            cause = "client_disconnect"
        elif code >= 500:
            cause = "server_error"
        else:
            cause = "client_error" if code >= 400 else "ok"
    HTTP_RESPONSES.labels(route, str(code), cause).inc()


def record_prediction(model_id: str, prediction: Prediction, latency_s: float, timing: Timing | None) -> None:
    """Count one PREDICT answer. ``timing`` None = answered without the device (no queue wait to record)."""
    REQUEST_LATENCY.labels("predict", model_id).observe(latency_s)
    if timing is not None:
        QUEUE_WAIT.labels(model_id).observe(timing.queued_s)
    PREDICTIONS.labels(model_id).inc()
    if prediction.abstained:
        ABSTENTIONS.labels("predict", model_id).inc()


def record_certificate(
    model_id: str, abstained: bool, radius: float, latency_s: float, timing: Timing | None, endpoint: str = "certify"
) -> None:
    """Count one CERTIFY answer; its radius goes to CERTIFIED_RADIUS only if it did not abstain.

    ``timing`` None = a cache hit (no queue wait to record). ``endpoint`` labels latency and
    abstentions, e.g. "certify" or "job".
    """
    REQUEST_LATENCY.labels(endpoint, model_id).observe(latency_s)
    if timing is not None:
        QUEUE_WAIT.labels(model_id).observe(timing.queued_s)
    CERTIFICATIONS.labels(model_id).inc()
    if abstained:
        ABSTENTIONS.labels(endpoint, model_id).inc()
    else:
        CERTIFIED_RADIUS.labels(model_id).observe(radius)


def record_samples(mode: str, samples: int) -> None:
    """Samples one computed certification spent (cache hits spend none and are not recorded)."""
    SAMPLES_PER_CERTIFICATION.labels(mode).observe(samples)
