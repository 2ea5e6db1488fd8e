"""Simulate the radius test on the reference images' p_A to choose the futility level (issue 5).

    python -m training.studies.futility_sim --levels 0.001 0.01 0.05 --repeats 20

For every image of the fixed-n reference logs, p_A is taken to be its count_a / n at n = 100,000
and ``smoothing.sequential.radius_test`` is run on binomial draws of that p_A (no model): mean
samples per decision against fixed n, and agreement with the reference's decision, per
(σ, r, futility level). The futility level spends no α (stopping for futility only answers
"not certified"); it trades samples against agreement with fixed n.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from smoothing.sequential import DEFAULT_N_MAX, radius_test, run
from training.analyze import read_log
from training.studies.sample_efficiency import ALPHA, N0


def simulate(log: Path, sigma: float, radius: float, level: float, repeats: int, rng: np.random.Generator) -> dict:
    reference = read_log(log)
    samples, agree = [], []
    for predict, fixed_radius, count_a, n in zip(
        reference["predict"], reference["radius"], reference["count_a"], reference["n"], strict=True
    ):
        p_a = count_a / n
        fixed = bool(predict >= 0 and fixed_radius >= radius)

        def sampler(request, p_a=p_a):  # class 0 plays ĉA, class 1 every other class
            k = request.stop - request.start
            hits = int(rng.binomial(k, p_a))
            return torch.tensor([hits, k - hits])

        for _ in range(repeats):
            decision = run(radius_test(radius=radius, sigma=sigma, alpha=ALPHA, n0=N0, futility_alpha=level), sampler)
            samples.append(decision.samples)
            agree.append(decision.certified == fixed)
    mean = float(np.mean(samples))
    return {
        "mean_samples": mean,
        "reduction": (N0 + DEFAULT_N_MAX) / mean if mean else float("inf"),
        "agreement": float(np.mean(agree)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", nargs="+", default=["0.25", "0.50"])
    parser.add_argument("--radii", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.001, 0.01, 0.05])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fixed-dir", type=Path, default=Path("results/fmnist"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print("| σ | r | futility level | mean samples | fewer samples (×) | agreement |")
    print("|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        log = args.fixed_dir / f"certify-n100k-sigma{sigma}.tsv"
        for radius in args.radii:
            for level in args.levels:
                cell = simulate(log, float(sigma), radius, level, args.repeats, rng)
                print(
                    f"| {float(sigma)} | {radius} | {level} | {cell['mean_samples']:.0f} | "
                    f"{cell['reduction']:.1f} | {100 * cell['agreement']:.1f}% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
