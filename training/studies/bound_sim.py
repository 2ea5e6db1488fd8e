"""The sequential procedures' bounds compared on the reference images' p_A (issue 16), by simulation.

    python -m training.studies.bound_sim --repeats 20 --adaptive-repeats 4

For every image of the fixed-n reference logs (results/fmnist/certify-n100k-sigma*.tsv: CERTIFY with n0 = 100,
n = 100,000, α = 0.001), p_A is taken to be its count_a / n, and the procedures of ``smoothing.sequential`` run
on binomial draws of that p_A (class 0 plays ĉA, class 1 every other class; no model), once per bound
(``smoothing.looks.BOUNDS``):

- the radius test at r ∈ {0.25, 0.5, 1.0}: mean and p95 samples per decision, and agreement with the
  reference's decision (certified at r when it did not abstain and its radius is ≥ r);
- the adaptive certificate at several tolerances: samples, the certified-accuracy curve against the
  reference's, the average certified radius (ACR: the radius of a correct prediction, else 0, averaged over
  the images) lost against the reference's, and the largest tolerance whose ACR loss stays within 0.05 and
  0.02 (the terms of input-specific sampling, Chen et al., AAAI 2022);
- the largest radius n_max samples can certify with each bound, against fixed n's σ·Φ⁻¹(α^(1/n)).

Writes JSON and a Markdown section (``--report``) that BENCHMARKS.md includes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from smoothing.looks import BOUNDS, DEFAULT_BOUND, max_certifiable_radius
from smoothing.sequential import DEFAULT_N_MAX, SampleRequest, adaptive_certify, radius_test, run
from training.analyze import read_log
from training.studies.sample_efficiency import ALPHA, N0, certified_accuracy_curve

RADII = (0.25, 0.5, 1.0)
TOLERANCES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
ACR_LOSSES = (0.05, 0.02)
FIXED_SAMPLES = N0 + DEFAULT_N_MAX


def binomial_sampler(p_a: float, rng: np.random.Generator) -> Callable[[SampleRequest], torch.Tensor]:
    """Counts of class 0 (probability p_a) and class 1 (the rest) on the requested number of samples."""

    def sample(request: SampleRequest) -> torch.Tensor:
        size = request.stop - request.start
        hits = int(rng.binomial(size, p_a))
        return torch.tensor([hits, size - hits])

    return sample


def radius_cell(
    reference: dict, sigma: float, radius: float, bound: str, repeats: int, rng, n0: int = N0, **options
) -> dict:
    """Samples and agreement of the radius test at ``radius`` over every reference image, ``repeats`` runs each.

    Selection is simulated too: ĉA is the larger of n0 binomial draws of class 0 (p_A) against class 1 (the
    rest, lumped into one class: the logs hold no runner-up probability), so a small n0 picks class 1 on
    near-ties; a decision agrees with fixed n only when it certifies class 0 exactly when fixed n certified.
    """
    samples, agree = [], []
    for predict, fixed_radius, count_a, n in zip(
        reference["predict"], reference["radius"], reference["count_a"], reference["n"], strict=True
    ):
        fixed = bool(predict >= 0 and fixed_radius >= radius)
        sampler = binomial_sampler(count_a / n, rng)
        for _ in range(repeats):
            procedure = radius_test(radius=radius, sigma=sigma, alpha=ALPHA, n0=n0, bound=bound, **options)
            decision = run(procedure, sampler)
            samples.append(decision.samples)
            agree.append(decision.certified == fixed and decision.label in (None, 0))
    mean = float(np.mean(samples))
    return {
        "mean_samples": mean,
        "p95_samples": float(np.percentile(samples, 95)),
        "reduction": FIXED_SAMPLES / mean if mean else float("inf"),
        "agreement": float(np.mean(agree)),
    }


def average_certified_radius(predict: np.ndarray, label: np.ndarray, radius: np.ndarray) -> float:
    """ACR: the mean over images of the certified radius of a correct prediction, 0 otherwise."""
    return float(np.mean(np.where((predict == label) & (predict >= 0), radius, 0.0)))


def adaptive_cell(reference: dict, sigma: float, tolerance: float, bound: str, repeats: int, rng) -> dict:
    """Samples, ACR loss and curve gap of the adaptive certificate at ``tolerance`` against the reference."""
    label = reference["label"]
    fixed_acr = average_certified_radius(reference["predict"], label, reference["radius"])
    fixed_curve = certified_accuracy_curve(reference["predict"], label, reference["radius"])
    samples, losses, gaps = [], [], []
    for _ in range(repeats):
        predicted, radii = [], []
        for predict, count_a, n in zip(reference["predict"], reference["count_a"], reference["n"], strict=True):
            procedure = adaptive_certify(sigma=sigma, alpha=ALPHA, n0=N0, tolerance=tolerance, bound=bound)
            certificate = run(procedure, binomial_sampler(count_a / n, rng))
            samples.append(certificate.samples)
            # Class 0 plays the reference's prediction (its label when the reference abstained).
            top = predict if predict >= 0 else -2
            predicted.append(-1 if certificate.label is None else (top if certificate.label == 0 else -3))
            radii.append(certificate.radius)
        predicted_array, radii_array = np.array(predicted), np.array(radii)
        losses.append(fixed_acr - average_certified_radius(predicted_array, label, radii_array))
        curve = certified_accuracy_curve(predicted_array, label, radii_array)
        gaps.append(float(100 * np.max(np.abs(fixed_curve - curve))))
    mean = float(np.mean(samples))
    return {
        "tolerance": tolerance,
        "mean_samples": mean,
        "p95_samples": float(np.percentile(samples, 95)),
        "reduction": FIXED_SAMPLES / mean,
        "acr_loss": float(np.mean(losses)),
        "max_curve_gap_points": float(np.mean(gaps)),
    }


def study(
    fixed_dir: Path, sigmas: list[str], bounds: list[str], repeats: int, adaptive_repeats: int, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    results = []
    for sigma_name in sigmas:
        sigma = float(sigma_name)
        reference = read_log(fixed_dir / f"certify-n100k-sigma{sigma_name}.tsv")
        started = time.perf_counter()
        per_bound = {}
        for bound in bounds:
            per_bound[bound] = {
                "cells": {str(r): radius_cell(reference, sigma, r, bound, repeats, rng) for r in RADII},
                "adaptive": [adaptive_cell(reference, sigma, t, bound, adaptive_repeats, rng) for t in TOLERANCES],
                "max_certifiable_radius": max_certifiable_radius(DEFAULT_N_MAX, ALPHA, sigma, bound),
            }
        results.append(
            {
                "sigma": sigma,
                "images": len(reference["idx"]),
                "fixed_max_radius": float(sigma * norm.ppf(ALPHA ** (1 / DEFAULT_N_MAX))),
                "fixed_acr": average_certified_radius(reference["predict"], reference["label"], reference["radius"]),
                "bounds": per_bound,
                "seconds": time.perf_counter() - started,
            }
        )
    return {"repeats": repeats, "adaptive_repeats": adaptive_repeats, "results": results}


def _best_within(adaptive: list[dict], loss: float) -> dict | None:
    """The adaptive cell with the fewest samples whose ACR loss is at most ``loss``."""
    within = [a for a in adaptive if a["acr_loss"] <= loss]
    return min(within, key=lambda a: a["mean_samples"]) if within else None


def markdown(measured: dict, command: str) -> str:
    results = measured["results"]
    bounds = list(results[0]["bounds"])
    lines = [
        "## Sample efficiency, second round: confidence sequences (issue 16)",
        "",
        f"Command: `{command}` (simulation: binomial draws from each reference image's p_A = count_a / n, no "
        f"model; {measured['repeats']} runs per image and radius, {measured['adaptive_repeats']} per image and "
        f"tolerance; α = {ALPHA}, n0 = {N0}, n_max = {DEFAULT_N_MAX:,}; fixed n: CERTIFY with n = "
        f"{DEFAULT_N_MAX:,} on the same {results[0]['images']} images per σ). Bounds: `confseq` = the mixture "
        "confidence sequence (`smoothing.confseq`) checked after every chunk (32, 64, 128, then every 128, then "
        "every 1/16 of the samples so far); `union` = Clopper–Pearson at α/11 at doubling looks; `union_fine` = "
        f"at α/32 at ×1.25 looks. Default: `{DEFAULT_BOUND}`. The first round's model run (one run per image) "
        "gave `union` 65.0× together and 25.7× in the worst cell where this simulation gives it about 65× and "
        "36×: a cell's mean hangs on one or two borderline images, so one run per image scatters widely.",
        "",
        "Radius decision, mean / p95 samples per decision and agreement with fixed n:",
        "",
        "| σ | r | " + " | ".join(f"{b}: mean / p95 (×) / agree" for b in bounds) + " |",
        "|---|---|" + "---|" * len(bounds),
    ]
    totals = {b: 0.0 for b in bounds}
    worst = {b: float("inf") for b in bounds}
    agreement = {b: 1.0 for b in bounds}
    cells_count = 0
    for res in results:
        for r in res["bounds"][bounds[0]]["cells"]:
            cells_count += 1
            row = []
            for b in bounds:
                cell = res["bounds"][b]["cells"][r]
                totals[b] += cell["mean_samples"]
                worst[b] = min(worst[b], cell["reduction"])
                agreement[b] = min(agreement[b], cell["agreement"])
                row.append(
                    f"{cell['mean_samples']:.0f} / {cell['p95_samples']:.0f} ({cell['reduction']:.1f}×) / "
                    f"{100 * cell['agreement']:.1f}%"
                )
            lines.append(f"| {res['sigma']} | {r} | " + " | ".join(row) + " |")
    lines += [
        "",
        "All cells together: "
        + "; ".join(
            f"`{b}` {cells_count * FIXED_SAMPLES / totals[b]:.1f}× (worst cell {worst[b]:.1f}×)" for b in bounds
        )
        + " fewer samples than fixed n (target ≥ 100× together, ≥ 30× in every cell); lowest agreement of a cell "
        + ", ".join(f"`{b}` {100 * agreement[b]:.1f}%" for b in bounds)
        + " (target ≥ 99 %). Verdict: "
        + "; ".join(
            f"`{b}` "
            + ("meets" if cells_count * FIXED_SAMPLES / totals[b] >= 100 else "misses")
            + " 100× together, "
            + ("meets" if worst[b] >= 30 else "misses")
            + " 30× per cell, "
            + ("meets" if agreement[b] >= 0.99 else "misses")
            + " 99 %"
            for b in bounds
        )
        + ". The means are set by the few images whose p_A sits within a percent of Φ(r/σ): agreeing with fixed "
        "n on them takes tens of thousands of samples whatever the bound, and one such image at ~80,000 samples "
        "adds ~800 to its cell's mean.",
        "",
        "Largest radius n_max samples can certify (all samples agree), against fixed-n CERTIFY's at the same n "
        "(target: within 0.01):",
        "",
        "| σ | fixed n | " + " | ".join(bounds) + " |",
        "|---|---|" + "---|" * len(bounds),
    ]
    for res in results:
        lines.append(
            f"| {res['sigma']} | {res['fixed_max_radius']:.3f} | "
            + " | ".join(
                f"{res['bounds'][b]['max_certifiable_radius']:.3f} "
                f"({res['bounds'][b]['max_certifiable_radius'] - res['fixed_max_radius']:+.3f})"
                for b in bounds
            )
            + " |"
        )
    lines += [
        "",
        "The curve gap (last column below) is largest at the grid point r = 0.95 just under fixed n's ceiling: "
        "every image on which all samples agree sits at fixed n's 0.953 but at most at each bound's ceiling above.",
    ]
    lines += [
        "",
        "Adaptive certificate against fixed n: mean / p95 samples (× fewer), loss of average certified radius "
        "(ACR) and largest gap of the certified-accuracy curves (points):",
        "",
        "| σ | tolerance | " + " | ".join(f"{b}: samples (×) / ACR loss / gap" for b in bounds) + " |",
        "|---|---|" + "---|" * len(bounds),
    ]
    for res in results:
        for i, tolerance in enumerate(a["tolerance"] for a in res["bounds"][bounds[0]]["adaptive"]):
            row = []
            for b in bounds:
                a = res["bounds"][b]["adaptive"][i]
                row.append(
                    f"{a['mean_samples']:.0f} / {a['p95_samples']:.0f} ({a['reduction']:.1f}×) / "
                    f"{a['acr_loss']:+.3f} / {a['max_curve_gap_points']:.1f}"
                )
            lines.append(f"| {res['sigma']} | {tolerance} | " + " | ".join(row) + " |")
    lines += [
        "",
        "On the terms of input-specific sampling (Chen et al., AAAI 2022: > 3× fewer samples at an ACR loss "
        "≤ 0.05): the fewest samples of a tolerance above whose ACR loss stays within the limit",
        "",
        "| σ | fixed-n ACR | ACR loss ≤ | " + " | ".join(bounds) + " |",
        "|---|---|---|" + "---|" * len(bounds),
    ]
    for res in results:
        for loss in ACR_LOSSES:
            row = []
            for b in bounds:
                best = _best_within(res["bounds"][b]["adaptive"], loss)
                row.append(
                    "none"
                    if best is None
                    else f"{best['reduction']:.1f}× (tolerance {best['tolerance']}, loss {best['acr_loss']:.3f})"
                )
            lines.append(f"| {res['sigma']} | {res['fixed_acr']:.3f} | {loss} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Simulation time: " + ", ".join(f"σ = {res['sigma']} {res['seconds']:.0f} s" for res in results) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", nargs="+", default=["0.25", "0.50"])
    parser.add_argument("--bounds", nargs="+", default=list(BOUNDS), choices=BOUNDS)
    parser.add_argument("--repeats", type=int, default=20, help="runs per image and radius")
    parser.add_argument("--adaptive-repeats", type=int, default=4, help="runs per image and tolerance")
    parser.add_argument("--fixed-dir", type=Path, default=Path("results/fmnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/sample-efficiency/bounds.json"))
    parser.add_argument("--report", type=Path, default=Path("results/sample-efficiency/bounds.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite --report from --out, measuring nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        measured = json.loads(args.out.read_text())
        args.report.write_text(markdown(measured, measured["command"]))
        return
    measured = study(args.fixed_dir, args.sigmas, args.bounds, args.repeats, args.adaptive_repeats, args.seed)
    command = "python -m training.studies.bound_sim " + " ".join(sys.argv[1:] if argv is None else argv)
    measured["command"] = command.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measured, indent=1))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(measured, command.strip()))
    print(args.report.read_text())


if __name__ == "__main__":
    main()
