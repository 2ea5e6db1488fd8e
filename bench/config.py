"""The sizes of one benchmark run: the full run (minutes), the brief one (full sizes, short windows: a lent GPU's
few minutes) and the quick smoke-test run (seconds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and durations of every part of a run; seconds are wall-clock, n counts noise samples."""

    quick: bool
    batch_candidates: tuple[int, ...] | None  # batch sizes swept for L; None = smoothing.tuning's defaults
    limit_seconds: float  # one measurement window of L (also the bracketing windows of later parts)
    precision_seconds: float  # one throughput window per precision candidate
    precision_rounds: int  # alternating (float32, reduced) window pairs per precision
    precision_images: int  # images certified per precision to compare radii (only when a precision is faster)
    precision_n: int
    library_rounds: int  # rounds of (L window, library window), interleaved against drift
    library_seconds: float  # certifications run back to back for at least this long per round
    n0: int  # CERTIFY's selection samples in every part
    certify_n: int  # CERTIFY's estimation samples of the service load and the saturating clients
    alpha: float
    service_ks: tuple[int, ...]  # concurrent certify clients
    service_warmup_s: float  # after the K clients start, before the window opens
    service_window_s: float  # measurement window of K < max(service_ks)
    memory_s: float  # window of the largest K, sampling the service's RSS throughout
    memory_interval_s: float
    predict_n: int
    idle_predicts: int  # sequential predicts on an idle service
    saturated_predicts: int  # sequential predicts while certifications saturate the device
    saturating_clients: int
    sweep_concurrency: tuple[int, ...]  # concurrent predict clients of the latency/throughput sweep
    sweep_window_s: float
    mixed_predicts: int  # predicts (n = predict_n) of the mixed load
    mixed_certify_ns: tuple[int, ...]  # one certification per entry, n = entry
    mixed_rounds: int  # the mixed load is served this many times by each side; the median round counts
    mixed_arrival_span_s: float  # every request of the mixed load arrives within this many seconds (shorter than
    # either side needs to serve it, so that throughput is measured, not the arrival rate)
    client_cost_requests: int  # requests per round of the load generators' CPU-cost comparison
    client_cost_concurrency: int  # connections (requests in flight) of that comparison
    client_cost_rounds: int  # alternating rounds (load generator, httpx); the medians count
    cache_hits: int  # repeated certifications of one input, answered from the cache
    cache_n: int  # n of the certification that fills the cache
    server_start_timeout_s: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


FULL = BenchConfig(
    quick=False,
    batch_candidates=None,
    limit_seconds=2.0,
    precision_seconds=1.0,
    precision_rounds=3,
    precision_images=4,
    precision_n=10_000,
    library_rounds=5,
    library_seconds=5.0,
    n0=100,
    certify_n=10_000,
    alpha=0.001,
    service_ks=(1, 4, 16, 64),
    service_warmup_s=3.0,
    service_window_s=20.0,
    memory_s=300.0,
    memory_interval_s=5.0,
    predict_n=100,
    idle_predicts=200,
    saturated_predicts=200,
    saturating_clients=4,
    sweep_concurrency=(1, 2, 4, 8, 16, 32, 64),
    sweep_window_s=6.0,
    mixed_predicts=500,
    mixed_certify_ns=(10_000, 20_000, 50_000),
    mixed_rounds=3,
    mixed_arrival_span_s=0.5,
    client_cost_requests=2_000,
    client_cost_concurrency=16,
    client_cost_rounds=3,
    cache_hits=300,
    cache_n=10_000,
    server_start_timeout_s=180.0,
)

# Every part at full request sizes, in windows short enough that two models fit a lent GPU's ten-minute
# command (bench/gpu/run.sh); its memory window is too short to judge growth.
BRIEF = replace(
    FULL,
    library_rounds=3,
    library_seconds=2.0,
    service_warmup_s=2.0,
    service_window_s=6.0,
    memory_s=12.0,
    memory_interval_s=2.0,
    idle_predicts=100,
    saturated_predicts=100,
    sweep_concurrency=(1, 4, 16, 64),
    sweep_window_s=3.0,
    mixed_rounds=1,
    client_cost_rounds=1,
    client_cost_requests=500,
)

QUICK = BenchConfig(
    quick=True,
    batch_candidates=(64, 256),
    limit_seconds=0.3,
    precision_seconds=0.2,
    precision_rounds=1,
    precision_images=2,
    precision_n=1_000,
    library_rounds=1,
    library_seconds=0.5,
    n0=100,
    certify_n=500,
    alpha=0.001,
    service_ks=(1, 4, 16, 64),
    service_warmup_s=0.3,
    service_window_s=1.0,
    memory_s=5.0,
    memory_interval_s=1.0,
    predict_n=100,
    idle_predicts=10,
    saturated_predicts=10,
    saturating_clients=4,
    sweep_concurrency=(1, 4, 16),
    sweep_window_s=0.7,
    mixed_predicts=20,
    mixed_certify_ns=(1_000, 2_000),
    mixed_rounds=1,
    mixed_arrival_span_s=0.3,
    client_cost_requests=64,
    client_cost_concurrency=4,
    client_cost_rounds=1,
    cache_hits=20,
    cache_n=200,
    server_start_timeout_s=120.0,
)
