"""Make a base classifier fast for sampling on a device, and measure its best batch size.

On a 2-core CPU a small CNN ran ~3x faster at batch 32 than at the paper's 1,000, and
channels-last was up to 2x faster; neither is predictable from first principles, so
``prepare_for_inference`` measures a short sweep and caches the answer per (model, device).
A cached plan is a starting point: re-validated at the next start (``revalidate``), and its batch
size refined while the service serves (service.engine.refine), which ``store_batch_size`` writes
back to the cache. Precision is chosen (and its plan re-validated) at start only.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smoothing.runtime import PRECISIONS, fold_batchnorm, keep_freed_memory, with_precision

log = logging.getLogger(__name__)

CPU_BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
GPU_BATCH_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)
FASTER_BY = 1.2  # reduced precision must beat float32 by this factor (median of interleaved pairs) to be chosen
# The sweep is noisy on a shared machine (another process takes a core mid-window). Noise only ever slows a
# window down, so every candidate is measured in SWEEP_ROUNDS interleaved rounds and scored by its fastest
# window (timeit's rule: the best of k repeats is the estimate, slower ones measured interference). Sanity
# check: the chosen size's median window must reach SANE_FRACTION of its fastest, or the machine was too
# noisy to trust the comparison and the sweep is repeated, at most SWEEP_ATTEMPTS times.
SWEEP_ROUNDS = 3
SWEEP_WINDOW_S = 0.1
SANE_FRACTION = 0.8
SWEEP_ATTEMPTS = 3
PRECISION_ROUNDS = 3  # interleaved (float32, reduced) window pairs behind a precision decision
REVALIDATE_GAIN = 1.1  # a cached plan's batch moves to a neighbouring size measured this much faster
# A plan's interactive batch is the smallest within this fraction of the best throughput: near its top the
# curve is flat, and a batch 2-4x smaller is a 2-4x shorter wait for a prediction that arrives while it runs.
# 0.85, not 0.95: with one-thread executors (CERTSERVE_DEVICES=auto on a CPU) batch 128 runs 13 % below 256,
# and taking it cut the saturated predict p99 from ~39 to ~30 ms (p50 23 -> 17 ms; bench/findings.md).
NEAR_BEST = 0.85
_plans: dict[str, dict[str, object]] = {}
_cache_lock = threading.Lock()  # executors of one process may record refined plans at once (store_batch_size)


@dataclass(frozen=True)
class InferencePlan:
    """How to run a model for sampling: the optimized module and its measured batch sizes."""

    model: nn.Module  # eval mode, BatchNorm folded, channels-last when that was faster
    batch_size: int  # the fastest
    channels_last: bool
    samples_per_second: float  # noise + forward + argmax, measured at batch_size
    precision: str = "float32"  # "float32", or the autocast dtype the model runs under
    interactive_batch_size: int = 0  # the smallest near the fastest (pick_batch); 0 = batch_size
    plan_key: str = ""  # what the plan is cached under (in memory and in the cache file); "" = not cached
    pinned: bool = False  # swept over one size only: neither re-validated at start nor refined while serving

    def __post_init__(self) -> None:
        if not self.interactive_batch_size:
            object.__setattr__(self, "interactive_batch_size", self.batch_size)


@torch.inference_mode()
def measure_throughput(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    channels_last: bool,
    device: torch.device,
    seconds: float = 0.2,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Samples per second of noise + forward + argmax at ``batch_size`` (after one warm-up batch), in inference mode,
    timed by ``clock`` (seconds)."""
    x = torch.rand(input_shape, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.inference_mode()
    def step() -> None:
        batch = (x + 0.5 * torch.randn((batch_size, *input_shape), device=device)).contiguous(
            memory_format=memory_format
        )
        model(batch).argmax(1).cpu()

    step()
    done, started = 0, clock()
    while done == 0 or clock() - started < seconds:
        step()
        done += batch_size
    return done / (clock() - started)


def sweep_windows(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    channels_last: bool,
    candidates: tuple[int, ...],
    *,
    rounds: int = SWEEP_ROUNDS,
    seconds: float = SWEEP_WINDOW_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, list[float]]:
    """Every window's throughput (samples/s) per candidate batch size, over ``rounds`` interleaved rounds.

    The first round goes up the sizes and stops once the rate falls for two sizes in a row or one batch
    takes over a second (large inputs on a CPU); later rounds re-measure the sizes it reached, in
    alternating order, so that a stall or a drift of a shared machine falls on different sizes."""
    windows: dict[int, list[float]] = {}
    falls = 0
    for batch_size in candidates:
        rate = measure_throughput(model, input_shape, batch_size, channels_last, device, seconds, clock)
        falls = falls + 1 if windows and rate < max(max(w) for w in windows.values()) else 0
        windows[batch_size] = [rate]
        if falls >= 2 or batch_size / rate > 1.0:
            break
    for k in range(1, rounds):
        for batch_size in sorted(windows, reverse=k % 2 == 1):
            windows[batch_size].append(
                measure_throughput(model, input_shape, batch_size, channels_last, device, seconds, clock)
            )
    return windows


def sweep_batch_sizes(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    channels_last: bool,
    candidates: tuple[int, ...],
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Throughput (fastest window, see SWEEP_ROUNDS) at each candidate batch size reached (``sweep_windows``)."""
    windows = sweep_windows(model, input_shape, device, channels_last, candidates, clock=clock)
    return {batch: max(rates) for batch, rates in sorted(windows.items())}


def precision_ratio(pairs: list[tuple[float, float]]) -> float:
    """How much faster a reduced precision ran than float32: the median of interleaved (float32, reduced)
    window pairs. One policy for the tuner and the benchmark: it is worth running where this is ≥ FASTER_BY."""
    return statistics.median(reduced / full for full, reduced in pairs)


def pick_batch(rates: dict[int, float], near_best: float = NEAR_BEST) -> int:
    """The smallest batch size whose throughput is within ``near_best`` of the best one's."""
    best = max(rates.values())
    return min(batch for batch, rate in rates.items() if rate >= near_best * best)


def interactive_size(settings: dict[str, object]) -> int:
    """A stored plan's interactive batch, at most its batch size: ``pick_batch`` of its sweep table when it has one
    (so that a cached plan follows NEAR_BEST as it is now), else the size stored with it."""
    batch = int(settings["batch_size"])
    sweep = settings.get("sweep")
    if isinstance(sweep, dict) and sweep:
        return min(pick_batch({int(b): float(r) for b, r in sweep.items()}), batch)
    return min(int(settings.get("interactive_batch_size", batch)), batch)


def parse_plan_key(key: str) -> dict[str, str]:
    """The fields of a plan's key in the tuning cache (written by ``_plan_key``): cache_key, device, threads,
    torch, precision."""
    cache_key, device, *rest = key.split("|")
    return {"cache_key": cache_key, "device": device, **dict(part.split("=", 1) for part in rest)}


def _plan_key(cache_key: str, device: torch.device, precision: str) -> str:
    return f"{cache_key}|{device}|threads={torch.get_num_threads()}|torch={torch.__version__}|precision={precision}"


def _sweep(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    candidates: tuple[int, ...],
    precision: str,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, object]:
    """The plan's settings: the faster memory format, its fastest batch and ``pick_batch``'s, and the sweep table;
    with precision="auto", a reduced precision where ``precision_ratio`` ≥ FASTER_BY. Repeated (at most
    SWEEP_ATTEMPTS times) while the chosen batch's median window is below SANE_FRACTION of its fastest."""
    for attempt in range(1, SWEEP_ATTEMPTS + 1):
        windows = {}
        for channels_last in (False, True):
            trial = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            trial = with_precision(trial, "float32" if precision == "auto" else precision, device)
            windows[channels_last] = sweep_windows(trial, input_shape, device, channels_last, candidates, clock=clock)
        tables = {fmt: {b: max(r) for b, r in sorted(w.items())} for fmt, w in windows.items()}
        channels_last = max(tables, key=lambda fmt: max(tables[fmt].values()))
        table = tables[channels_last]
        batch_size = max(table, key=table.__getitem__)
        median = statistics.median(windows[channels_last][batch_size])
        if median >= SANE_FRACTION * table[batch_size]:
            break
        log.warning(
            "sweep %d: batch %d's median window %.0f samples/s is below %.0f%% of its fastest (%.0f): noisy, %s",
            attempt,
            batch_size,
            median,
            100 * SANE_FRACTION,
            table[batch_size],
            "again" if attempt < SWEEP_ATTEMPTS else "kept",
        )
    rate, chosen = table[batch_size], ("float32" if precision == "auto" else precision)
    if precision == "auto":
        formatted = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        full = with_precision(formatted, "float32", device)
        for reduced in ("bfloat16", "float16") if device.type == "cuda" else ("bfloat16",):
            trial = with_precision(formatted, reduced, device)
            pairs = [
                tuple(
                    measure_throughput(m, input_shape, batch_size, channels_last, device, SWEEP_WINDOW_S, clock)
                    for m in (full, trial)
                )
                for _ in range(PRECISION_ROUNDS)
            ]
            ratio = precision_ratio(pairs)
            if ratio >= FASTER_BY and ratio * table[batch_size] > rate:  # (the sweep's rate, scaled)
                rate, chosen = ratio * table[batch_size], reduced
    return dict(
        batch_size=batch_size,
        interactive_batch_size=pick_batch(table),
        channels_last=channels_last,
        samples_per_second=rate,
        precision=chosen,
        sweep={str(b): r for b, r in table.items()},
    )


def revalidate(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    settings: dict[str, object],
    candidates: tuple[int, ...],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, object]:
    """A cached plan as a starting point: its batch and the neighbouring candidate sizes are timed now, in
    interleaved rounds (fastest window, as the sweep), and the batch moves to a neighbour that is
    REVALIDATE_GAIN faster, until none is. Memory format and precision are kept. Returns the settings."""
    channels_last = bool(settings["channels_last"])
    trial = with_precision(
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
        str(settings.get("precision", "float32")),
        device,
    )
    sizes = sorted(set(candidates) | {int(settings["batch_size"])})
    batch, measured = int(settings["batch_size"]), {}
    for _ in range(len(sizes)):
        at = sizes.index(batch)
        around = [b for b in sizes[max(0, at - 1) : at + 2] if b not in measured]
        for k in range(SWEEP_ROUNDS):
            for b in around if k % 2 == 0 else around[::-1]:
                rate = measure_throughput(trial, input_shape, b, channels_last, device, SWEEP_WINDOW_S, clock)
                measured.setdefault(b, []).append(rate)
        rates = {b: max(r) for b, r in measured.items()}
        best = max(rates, key=rates.__getitem__)
        if best == batch or rates[best] < REVALIDATE_GAIN * rates[batch]:
            break
        batch = best
    if batch == int(settings["batch_size"]):
        return settings
    log.info("cached plan corrected: batch %s → %d (%.0f samples/s)", settings["batch_size"], batch, rates[batch])
    return {
        **settings,
        "batch_size": batch,
        "interactive_batch_size": interactive_size({**settings, "batch_size": batch}),
        "samples_per_second": rates[batch],
    }


def prepare_for_inference(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    cache_key: str | None = None,
    cache_file: Path | None = None,
    candidates: tuple[int, ...] | None = None,
    precision: str = "float32",
    clock: Callable[[], float] = time.perf_counter,
) -> InferencePlan:
    """Fold BatchNorm, move to ``device``, and pick the fastest memory format and batch size, and an interactive batch.

    ``precision``: "float32" (the default, the checkpoint as trained), "bfloat16"/"float16"
    (autocast), or "auto": float32 unless bfloat16 (float16 too on CUDA) is measured FASTER_BY
    faster (it was 20x slower on CPUs without native bf16, 2x faster on one with AVX512-BF16).
    The sweep (a few seconds) is cached in memory under ``cache_key`` (e.g. the checkpoint's
    sha256) and, when ``cache_file`` is given, in that JSON file. Also turns on flushing of
    denormal floats on the calling thread, which made trained models ~1.5x faster on CPU and
    does not change argmax decisions beyond float rounding, and ``keep_freed_memory``.
    """
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    model = fold_batchnorm(model.to(device))
    key = _plan_key(cache_key, device, precision) if cache_key else None
    settings = _plans.get(key) if key else None
    if candidates is None:
        candidates = GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES
    if key and settings is None and cache_file is not None and cache_file.exists():
        settings = json.loads(cache_file.read_text()).get(key)
        # From another start, perhaps on a busier machine: re-validated, unless it was swept over one size only.
        if settings is not None and not _pinned(settings, candidates):
            settings = revalidate(model, input_shape, device, settings, candidates, clock)
    if settings is None:
        settings = _sweep(model, input_shape, device, candidates, precision, clock)
        log.info("plan for %s on %s: %s", cache_key, device, settings)
    if key:
        _plans[key] = settings
        if cache_file is not None:
            _write_cache(cache_file, key, settings)
    channels_last = bool(settings["channels_last"])
    precision = str(settings.get("precision", "float32"))
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return InferencePlan(
        model=with_precision(model, precision, device),
        batch_size=int(settings["batch_size"]),
        channels_last=channels_last,
        samples_per_second=float(settings["samples_per_second"]),
        precision=precision,
        interactive_batch_size=interactive_size(settings),
        plan_key=key or "",
        pinned=_pinned(settings, candidates),
    )


def _pinned(settings: dict[str, object], candidates: tuple[int, ...]) -> bool:
    """Whether a plan's batch size is fixed: swept over one size only, or asked for with one candidate."""
    return len(settings.get("sweep", candidates)) <= 1 or len(candidates) <= 1


def _write_cache(cache_file: Path, key: str, settings: dict[str, object]) -> None:
    """Store ``settings`` under ``key`` in ``cache_file``, keeping the other keys; the file is replaced whole
    (a reader never sees half of it)."""
    with _cache_lock:
        stored = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        stored[key] = settings
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.name}.{threading.get_ident()}.tmp")
        partial.write_text(json.dumps(stored, indent=2))
        partial.replace(cache_file)


def store_batch_size(plan: InferencePlan, batch_size: int, samples_per_second: float, cache_file: Path | None) -> None:
    """Record a batch size measured better while serving (service.engine.refine) as the plan's, in memory and in
    ``cache_file``, so that the next start begins from it (and re-validates it, as any cached plan). The interactive
    batch is kept, at most ``batch_size``; memory format and precision are kept. Nothing for an uncached plan."""
    if not plan.plan_key:
        return
    with _cache_lock:
        settings = _plans.get(plan.plan_key)
        if settings is None and cache_file is not None and cache_file.exists():
            settings = json.loads(cache_file.read_text()).get(plan.plan_key)
    if settings is None:
        return
    settings = {
        **settings,
        "batch_size": batch_size,
        "interactive_batch_size": interactive_size({**settings, "batch_size": batch_size}),
        "samples_per_second": samples_per_second,
    }
    _plans[plan.plan_key] = settings
    if cache_file is not None:
        _write_cache(cache_file, plan.plan_key, settings)


def plan_summary(plan: InferencePlan) -> dict[str, object]:
    """The plan without the module, for logs and API answers."""
    return {
        "batch_size": plan.batch_size,
        "interactive_batch_size": plan.interactive_batch_size,
        "channels_last": plan.channels_last,
        "samples_per_second": round(plan.samples_per_second, 1),
        "precision": plan.precision,
    }
