"""The radius decision's selection size n0 and first check, by simulation on the reference images' p_A (issue 16).

    python -m training.studies.n0_sim --repeats 10 --n0 100 50 32 16 --first-check 32 16

An input on which every sample agrees costs n0 selection samples plus the first check of the confidence
sequence, so n0 = 100 sets the floor of the easy cells. This runs the radius test (bound ``confseq``) at every
r of ``bound_sim.RADII`` on both σ's reference images for each (n0, first check), selection included (see
``bound_sim.radius_cell``), and reports samples against fixed n = 100,000 and agreement with its decisions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from smoothing.confseq import DECISION_PRIORS
from smoothing.looks import DEFAULT_CHECK_EVERY, FIRST_CHUNK, chunk_schedule
from smoothing.sequential import DEFAULT_DECISION_N0, DEFAULT_FUTILITY_ALPHA, DEFAULT_N_MAX
from training.analyze import read_log
from training.studies.bound_sim import FIXED_SAMPLES, RADII, radius_cell

TARGET_TOGETHER, TARGET_CELL, TARGET_AGREEMENT = 100.0, 30.0, 0.99


def sweep(
    fixed_dir: Path,
    sigmas: list[str],
    n0s: list[int],
    firsts: list[int],
    repeats: int,
    seed: int,
    futility_alphas: tuple[float, ...] = (DEFAULT_FUTILITY_ALPHA,),
) -> list:
    """One row per (futility level, n0, first check): every cell's mean samples and agreement, the reduction
    together and in the worst cell, the lowest and the mean agreement."""
    references = {s: read_log(fixed_dir / f"certify-n100k-sigma{s}.tsv") for s in sigmas}
    rows = []
    for futility_alpha, n0, first in itertools.product(futility_alphas, n0s, firsts):
        looks = chunk_schedule(DEFAULT_N_MAX, DEFAULT_CHECK_EVERY, first=first)
        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        cells = {
            f"{s}/{r}": radius_cell(
                references[s],
                float(s),
                r,
                "confseq",
                repeats,
                rng,
                n0=n0,
                looks=looks,
                futility_alpha=futility_alpha,
            )
            for s in sigmas
            for r in RADII
        }
        total = sum(c["mean_samples"] for c in cells.values())
        rows.append(
            {
                "futility_alpha": futility_alpha,
                "n0": n0,
                "first_check": first,
                "cells": cells,
                "together": len(cells) * FIXED_SAMPLES / total,
                "worst_cell": min(c["reduction"] for c in cells.values()),
                "min_agreement": min(c["agreement"] for c in cells.values()),
                "mean_agreement": sum(c["agreement"] for c in cells.values()) / len(cells),
                "seconds": time.perf_counter() - started,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "cells"}), flush=True)
    return rows


def markdown(rows: list, command: str, repeats: int) -> str:
    cells = list(rows[0]["cells"])
    lines = [
        "### The radius decision's n0, first check and futility level",
        "",
        f"Command: `{command}` (bound `confseq` with the decision's prior mixture b = "
        f"{' and '.join(str(b) for b in DECISION_PRIORS)}, {repeats} runs per image and cell, "
        "selection simulated as n0 binomial draws of ĉA against the rest lumped into one class; a decision agrees "
        "when it certifies the reference's class exactly when fixed n = 100,000 did). Targets: ≥ 100× fewer samples "
        "together, ≥ 30× in every cell, agreement ≥ 99 % in every cell.",
        "",
        "| futility | n0 | first check | together (×) | worst cell (×) | lowest / mean agreement | "
        + " | ".join(f"σ/r {c}" for c in cells)
        + " | meets all |",
        "|---|---|---|---|---|---|" + "---|" * len(cells) + "---|",
    ]
    for row in rows:
        meets = (
            row["together"] >= TARGET_TOGETHER
            and row["worst_cell"] >= TARGET_CELL
            and row["min_agreement"] >= TARGET_AGREEMENT
        )
        per_cell = " | ".join(f"{c['reduction']:.1f}× / {100 * c['agreement']:.1f}%" for c in row["cells"].values())
        lines.append(
            f"| {row['futility_alpha']} | {row['n0']} | {row['first_check']} | {row['together']:.1f} | "
            f"{row['worst_cell']:.1f} | {100 * row['min_agreement']:.2f}% / {100 * row['mean_agreement']:.2f}% | "
            f"{per_cell} | {'yes' if meets else 'no'} |"
        )
    lines += [
        "",
        f"The radius decision's defaults: futility level {DEFAULT_FUTILITY_ALPHA}, n0 = {DEFAULT_DECISION_N0} "
        f"(`CERTSERVE_DEFAULT_RADIUS_N0`), first check after {FIRST_CHUNK} estimation samples "
        "(`smoothing.sequential`, `smoothing.looks`). A cell's agreement hangs on the few images whose p_A sits "
        "within a percent of Φ(r/σ): the lowest cell moves by about ±0.1 point between seeds.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", nargs="+", default=["0.25", "0.50"])
    parser.add_argument("--n0", nargs="+", type=int, default=[100, 50, 32, 16])
    parser.add_argument("--first-check", nargs="+", type=int, default=[32, 16])
    parser.add_argument("--repeats", type=int, default=10, help="runs per image and cell")
    parser.add_argument("--fixed-dir", type=Path, default=Path("results/fmnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--futility-alpha", nargs="+", type=float, default=[DEFAULT_FUTILITY_ALPHA])
    parser.add_argument("--out", type=Path, default=Path("results/sample-efficiency/n0-decision.json"))
    parser.add_argument("--report", type=Path, default=Path("results/sample-efficiency/n0-decision.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = sweep(
        args.fixed_dir, args.sigmas, args.n0, args.first_check, args.repeats, args.seed, tuple(args.futility_alpha)
    )
    command = ("python -m training.studies.n0_sim " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "repeats": args.repeats, "rows": rows}, indent=1))
    args.report.write_text(markdown(rows, command, args.repeats))
    print(args.report.read_text())


if __name__ == "__main__":
    main()
