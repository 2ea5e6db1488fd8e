"""The limit L: the base classifier's raw throughput (noise + forward + argmax, samples/s) on this device.

Measured at the best batch size and memory format found by a sweep, BatchNorm folded, in
inference mode. Reduced precision (autocast) is tried and used only where it is faster and the
certified radii it gives match float32's within sampling error. A ladder of intermediate settings
(from the paper's loop — model as loaded, batch 1,000 — to L) shows where the speed comes from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bench.compute_thread import on_compute_thread
from models.checkpoint import Manifest
from models.registry import load_model
from smoothing.core import certify
from smoothing.runtime import Autocast, fold_batchnorm
from smoothing.tuning import (
    CPU_BATCH_SIZES,
    FASTER_BY,
    GPU_BATCH_SIZES,
    InferencePlan,
    measure_throughput,
    pick_batch,
    precision_ratio,
    prepare_for_inference,
    sweep_batch_sizes,
)

PAPER_BATCH = 1_000  # Cohen et al.'s certify loop: every request's samples in batches of 1,000


@dataclass(frozen=True)
class Limit:
    """The fastest correct configuration of the model; ``model`` is ``plan.model``, autocast-wrapped or not."""

    manifest: Manifest
    raw_model: nn.Module  # as loaded from the checkpoint: eval mode, nothing folded (the paper's loop uses it)
    plan: InferencePlan
    model: nn.Module
    precision: str  # "float32", "float16" or "bfloat16"
    device: torch.device

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def channels_last(self) -> bool:
        return self.plan.channels_last


def limit_rate(limit: Limit, seconds: float) -> float:
    """One measurement of L: samples/s of noise + forward + argmax at the best batch, over ``seconds``."""
    return on_compute_thread(
        measure_throughput,
        limit.model,
        limit.manifest.input_shape,
        limit.batch_size,
        limit.channels_last,
        limit.device,
        seconds,
    )


def bracketed_limit(limit: Limit, seconds: float, before: float) -> tuple[float, float]:
    """L measured now, and the mean of that and ``before``: a part measured between two L windows
    is compared with their mean, which cancels slow drifts of a shared machine's speed."""
    after = limit_rate(limit, seconds)
    return after, (before + after) / 2


def reduced_precisions(device: torch.device) -> list[torch.dtype]:
    """The autocast precisions worth trying on ``device``."""
    if device.type == "cuda":
        return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return [torch.bfloat16]  # CPU autocast supports bfloat16 (and float16 only as an emulation)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def radius_check(
    plan: InferencePlan, reduced: nn.Module, manifest: Manifest, images: torch.Tensor, *, n0: int, n: int, alpha: float
) -> dict[str, object]:
    """Certify each image in float32 and in reduced precision with the same seed, and in float32 with
    another seed (the sampling spread). Passes when, for every image, the top class agrees and the
    count of the top class differs by at most 3 binomial standard deviations (+1)."""
    common = dict(
        sigma=manifest.sigma,
        num_classes=manifest.num_classes,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=plan.batch_size,
        channels_last=plan.channels_last,
    )
    rows = []
    for i, x in enumerate(images):
        full = certify(plan.model, x, seed=1_000 + i, **common)
        low = certify(reduced, x, seed=1_000 + i, **common)
        other_seed = certify(plan.model, x, seed=2_000 + i, **common)
        p = full.n_a / n
        allowed = 3 * math.sqrt(n * p * (1 - p)) + 1
        rows.append(
            {
                "radius_float32": full.radius,
                "radius_reduced": low.radius,
                "radius_float32_other_seed": other_seed.radius,
                "n_a_float32": full.n_a,
                "n_a_reduced": low.n_a if low.top_class == full.top_class else None,
                "n_a_allowed_difference": round(allowed, 1),
                "ok": low.top_class == full.top_class and abs(low.n_a - full.n_a) <= allowed,
            }
        )
    return {
        "images": len(rows),
        "n0": n0,
        "n": n,
        "max_radius_difference_same_seed": max(abs(r["radius_reduced"] - r["radius_float32"]) for r in rows),
        "max_radius_difference_between_seeds": max(
            abs(r["radius_float32_other_seed"] - r["radius_float32"]) for r in rows
        ),
        "passed": all(r["ok"] for r in rows),
        "rows": rows,
    }


def paper_loop_rate(
    raw_model: nn.Module, input_shape: tuple[int, int, int], device: torch.device, seconds: float
) -> float:
    """Throughput of the model as loaded at batch 1,000, contiguous, with denormal floats kept (the paper's setting).

    Call it on the compute thread: the denormal mode is a per-thread CPU flag.
    """
    torch.set_flush_denormal(False)
    try:
        return measure_throughput(raw_model, input_shape, PAPER_BATCH, False, device, seconds)
    finally:
        torch.set_flush_denormal(True)  # the benchmark's setting everywhere else, as prepare_for_inference's


def measure_limit(
    model_dir: Path,
    model_id: str,
    device: torch.device,
    *,
    candidates: tuple[int, ...] | None,
    seconds: float,
    precision_seconds: float,
    precision_rounds: int,
    check_images: torch.Tensor | None,
    check_n0: int,
    check_n: int,
    alpha: float,
    tuning_cache: Path,
) -> tuple[Limit, dict[str, object]]:
    """Find and measure L; also writes the chosen plan to ``tuning_cache`` so the service uses the same one.

    Call it through ``on_compute_thread`` (see bench.compute_thread).
    Each reduced precision is timed against float32 in ``precision_rounds`` alternating pairs of
    windows; ``check_images`` are certified to compare radii (only if it is faster).
    Returns the Limit and the section of the results file.
    """
    raw_model, manifest = load_model(model_dir, model_id, device)
    shape = manifest.input_shape
    started = time.perf_counter()
    ladder = [
        {
            "step": "paper loop: model as loaded, batch 1,000, contiguous, denormal floats kept",
            "samples_per_s": paper_loop_rate(raw_model, shape, device, seconds),
        }
    ]
    torch.set_flush_denormal(True)  # as prepare_for_inference does; in the ladder as its own step
    ladder.append(
        {
            "step": "+ denormal floats flushed to zero",
            "samples_per_s": measure_throughput(raw_model, shape, PAPER_BATCH, False, device, seconds),
        }
    )
    folded = fold_batchnorm(raw_model)
    ladder.append(
        {
            "step": "+ BatchNorm folded into the convolutions",
            "samples_per_s": measure_throughput(folded, shape, PAPER_BATCH, False, device, seconds),
        }
    )

    # The plan is the service's own tuning (same sweep, written to the cache file the service reads).
    plan = prepare_for_inference(
        raw_model, shape, device, cache_key=manifest.sha256, cache_file=tuning_cache, candidates=candidates
    )
    # A second sweep, kept for the report: it shows how clear the tuner's pick was.
    if candidates is None:
        candidates = GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES
    sweep: dict[str, dict[int, float]] = {}
    for channels_last in (False, True):
        trial = folded.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        sweep["channels_last" if channels_last else "contiguous"] = sweep_batch_sizes(
            trial, shape, device, channels_last, candidates
        )
    best_rate, best_batch, best_format = max(
        (rate, batch, fmt) for fmt, table in sweep.items() for batch, rate in table.items()
    )
    # L runs at the best batch of the plan's memory format; the service at the plan's (smallest near the best).
    memory_format = "channels-last" if plan.channels_last else "contiguous"
    table = sweep["channels_last" if plan.channels_last else "contiguous"]
    best_plan = replace(plan, batch_size=max(table, key=table.__getitem__))
    service_plan = plan
    unfolded = raw_model.to(memory_format=torch.channels_last if plan.channels_last else torch.contiguous_format)
    unfolded_rate = measure_throughput(unfolded, shape, best_plan.batch_size, plan.channels_last, device, seconds)
    raw_model.to(memory_format=torch.contiguous_format)
    float32 = Limit(manifest, raw_model, best_plan, plan.model, "float32", device)
    float32_rate = limit_rate(float32, seconds)
    ladder.append(
        {
            "step": f"+ best batch {best_plan.batch_size}, {memory_format} (= L in float32)",
            "samples_per_s": float32_rate,
        }
    )

    limit, rate, tried = float32, float32_rate, []
    for dtype in reduced_precisions(device):
        reduced = Autocast(plan.model, dtype, device.type)
        candidate = Limit(manifest, raw_model, plan, reduced, dtype_name(dtype), device)
        # Alternate the two precisions so that a shared machine's drift hits both alike.
        pairs = [
            (limit_rate(float32, precision_seconds), limit_rate(candidate, precision_seconds))
            for _ in range(precision_rounds)
        ]
        ratio = precision_ratio(pairs)  # the tuner's policy: worth it from FASTER_BY on
        reduced_rate = ratio * float32_rate
        entry: dict[str, object] = {
            "dtype": dtype_name(dtype),
            "samples_per_s": reduced_rate,
            "ratio_to_float32": ratio,
            "used": False,
            "pairs_samples_per_s": [[round(a), round(b)] for a, b in pairs],
        }
        if ratio < FASTER_BY:
            entry["reason"] = "not faster than float32 on this device"
        elif check_images is None or len(check_images) == 0:
            entry["reason"] = "faster, but no images to check radii with"
        else:
            check = radius_check(plan, candidate.model, manifest, check_images, n0=check_n0, n=check_n, alpha=alpha)
            entry["radius_check"] = check
            if not check["passed"]:
                entry["reason"] = "faster, but certified radii changed beyond sampling error"
            elif reduced_rate > rate:
                entry["reason"] = "faster, radii unchanged within sampling error"
                limit, rate = candidate, reduced_rate
        tried.append(entry)
    for entry in tried:
        entry["used"] = entry["dtype"] == limit.precision
    reduced_sweep: dict[int, float] = {}
    if limit is not float32:
        ladder.append({"step": f"+ {limit.precision} autocast", "samples_per_s": rate})
        # Its best batch may differ from float32's: sweep it too (in the plan's memory format).
        reduced_sweep = sweep_batch_sizes(limit.model, shape, device, plan.channels_last, candidates)
        batch = max(reduced_sweep, key=reduced_sweep.__getitem__)
        if batch != limit.batch_size:
            limit = replace(limit, plan=replace(plan, batch_size=batch))
            rate = limit_rate(limit, seconds)
            ladder.append({"step": f"+ batch {batch} (= L)", "samples_per_s": rate})

    if limit is not float32:  # the service's tuning cache gets its plan for this precision (CERTSERVE_PRECISION):
        # its own tuning, between L's batch and the smallest near it (smoothing.tuning.pick_batch)
        service_plan = prepare_for_inference(
            raw_model,
            shape,
            device,
            cache_key=manifest.sha256,
            cache_file=tuning_cache,
            candidates=tuple(sorted({limit.batch_size, pick_batch(reduced_sweep)})),
            precision=limit.precision,
        )
    section = {
        "model_as_measured": {
            "bn_folded": True,
            "batch_size": limit.batch_size,
            "service_batch_size": service_plan.batch_size,
            "service_interactive_batch_size": service_plan.interactive_batch_size,
            "channels_last": plan.channels_last,
            "precision": limit.precision,
            "inference_mode": True,
        },
        "samples_per_s": rate,
        "samples_per_s_float32": float32_rate,
        "batch_sweep": {fmt: {str(b): r for b, r in table.items()} for fmt, table in sweep.items()},
        "reduced_precision_batch_sweep": {str(b): r for b, r in reduced_sweep.items()},
        "sweep_best": {"batch_size": best_batch, "memory_format": best_format, "samples_per_s": best_rate},
        "bn_folding": {"folded_samples_per_s": float32_rate, "unfolded_samples_per_s": unfolded_rate},
        "precisions": tried,
        "ladder": ladder,
        "seconds": time.perf_counter() - started,
    }
    return limit, section
