"""Certified accuracy from CERTIFY logs: tables at fixed radii (Table 1, Appendix E), curves of
accuracy against radius (Figure 6) and, with ``--compare-bounds``, Theorem 1 against the bounds
of Lecuyer et al. and Li et al. on the same counts (Figure 8, left).

    analyze logs/fmnist-0.12.tsv logs/fmnist-0.25.tsv --labels σ=0.12 σ=0.25 --out-dir results

Reads the logs of ``certify`` and of the paper's own script (columns are looked up by header
name; ``time`` may be seconds or H:MM:SS.ffffff). For every log and radius r it reports the
approximate certified accuracy (the fraction of examples CERTIFY classified correctly with
radius ≥ r) and the Appendix D lower bound on the true certified accuracy (Theorem 6: holds
with probability ≥ 1 − ρ over CERTIFY's randomness, with α the α CERTIFY ran at). Radii are ℓ2
in the [0, 1] pixel space of the model's input.

It also reports the average certified radius (Zhai et al. 2020: the mean over examples of the
radius when correct, 0 when wrong or abstained). ``--common`` keeps only the example indices
that every log holds, to compare a run over fewer images with the matching rows of a longer one.

Writes ``certified_accuracy.md``, ``certified_accuracy.tex`` and the curves' PNG (drawn by
``training.plots``, which also draws the service's job plots); with ``--compare-bounds`` also
``bounds.md`` and ``bounds.png`` (needs the ``count_a n sigma`` columns that ``certify`` writes).
They go to ``--out-dir``, by default the folder of the first log, and every path written is
printed. Logs are labelled by ``--labels``, else by the σ they hold (``σ=0.25``, when every log
holds one σ and the σ differ), else by their full file names (the paper's ``noise_0.25`` and
``noise_0.50`` stay apart; a ``.tsv``/``.txt`` suffix is dropped).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from smoothing.accuracy import certified_count, true_accuracy_lower_bound
from smoothing.bounds import cohen_radius, lecuyer_radius, li_radius
from smoothing.statistics import lower_confidence_bound
from training.plots import certified_accuracies, plot_curves

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
DEFAULT_ALPHA = 0.001
REQUIRED_COLUMNS = ("idx", "label", "predict", "correct", "time")
BOUNDS: dict[str, Callable[[float, float, float], float]] = {
    "Cohen et al. (Theorem 1)": cohen_radius,
    "Lecuyer et al.": lecuyer_radius,
    "Li et al.": li_radius,
}
# str(datetime.timedelta), as the paper's script wrote it: "0:00:01.234567" or "1 day, 2:03:04.5"
_TIMEDELTA = re.compile(r"(?:(\d+) days?, )?(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")

Log = dict[str, np.ndarray]  # column name → values (float64), in the file's column order; time in seconds


def parse_seconds(text: str) -> float:
    """Seconds from plain seconds (``1.2345``) or str(datetime.timedelta) (``0:00:01.234500``)."""
    match = _TIMEDELTA.fullmatch(text.strip())
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def read_log(path: Path) -> Log:
    """Read a tab-separated certify/predict log; ValueError naming the file and line if malformed."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header line")
    header, body = rows[0], rows[1:]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; header is {header}")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
    log: Log = {}
    for i, name in enumerate(header):
        parse = parse_seconds if name == "time" else float
        log[name] = np.array([parse(row[i]) for row in body], dtype=float)
    return log


def correct(log: Log) -> np.ndarray:
    return log["correct"].astype(bool)


def average_certified_radius(log: Log) -> float:
    """Mean over the log's examples of the certified radius if correct, else 0 (ℓ2, the log's units)."""
    return float(np.mean(np.where(correct(log), log["radius"], 0.0)))


def common_rows(logs: list[Log]) -> list[Log]:
    """Each log restricted to the example indices that all the logs hold (in each log's order)."""
    shared = functools.reduce(np.intersect1d, [log["idx"] for log in logs])
    return [{name: values[np.isin(log["idx"], shared)] for name, values in log.items()} for log in logs]


def log_alpha(log: Log, path: Path, requested: float | None) -> float:
    """CERTIFY's α: the log's ``alpha`` column where there is one, else ``requested`` (default 0.001)."""
    if "alpha" not in log or log["alpha"].size == 0:
        return DEFAULT_ALPHA if requested is None else requested
    values = np.unique(log["alpha"])
    if values.size > 1:
        raise ValueError(f"{path}: rows were certified at several α {values.tolist()}; analyze them separately")
    if requested is not None and not np.isclose(values[0], requested):
        raise ValueError(f"{path}: --alpha {requested} but the log was certified at α = {values[0]}")
    return float(values[0])


def true_accuracy_bounds(
    radii: np.ndarray, hits: np.ndarray, at: Sequence[float], alpha: float, rho: float
) -> list[float]:
    """Theorem 6 lower bound on the true certified accuracy at each radius in ``at`` (each holds w.p. ≥ 1 − ρ)."""
    return [true_accuracy_lower_bound(certified_count(radii, hits, r), radii.size, alpha, rho) for r in at]


@functools.cache
def _bound_radii(count_a: int, n: int, sigma: float, alpha: float) -> tuple[float, ...]:
    # Many rows share (count_a, n): e.g. every example whose n samples all agreed.
    p_a_lower = lower_confidence_bound(count_a, n, alpha)
    return tuple(bound(p_a_lower, 1.0 - p_a_lower, sigma) for bound in BOUNDS.values())


def bound_radii(log: Log, path: Path, alpha: float) -> dict[str, np.ndarray]:
    """Each row's radius under every bound of ``BOUNDS``, from p̲A recomputed from ``count_a`` and ``n``
    (p̄B = 1 − p̲A, as CERTIFY). Rows CERTIFY got wrong or abstained on get 0 (they never count)."""
    missing = [c for c in ("count_a", "n", "sigma") if c not in log]
    if missing:
        raise ValueError(f"{path}: --compare-bounds needs the columns {missing} that `certify` writes")
    radii = np.zeros((len(BOUNDS), log["idx"].size))
    for row in np.flatnonzero(correct(log)):
        radii[:, row] = _bound_radii(int(log["count_a"][row]), int(log["n"][row]), float(log["sigma"][row]), alpha)
    return dict(zip(BOUNDS, radii, strict=True))


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def radius_header(radii: Sequence[float]) -> list[str]:
    return [f"r = {r:g}" for r in radii]


def markdown_table(header: list[str], rows: list[list[str]], label_columns: int = 2) -> str:
    """A GitHub-flavoured markdown table: the first ``label_columns`` left-aligned, the numbers right-aligned."""
    align = [":--" if i < label_columns else "--:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


_LATEX_SYMBOLS = {"σ": r"$\sigma$", "ρ": r"$\rho$", "α": r"$\alpha$", "≥": r"$\geq$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters and spell the Greek letters we use as math (pdflatex-safe)."""
    text = re.sub(r"([&%#_$])", r"\\\1", text)
    for symbol, latex in _LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def latex_table(header: list[str], rows: list[list[str]], label_columns: int = 2) -> str:
    """A booktabs ``tabular`` with the same cells and alignment as ``markdown_table``."""
    spec = "l" * label_columns + "r" * (len(header) - label_columns)
    body = [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in rows]
    return (
        "\n".join(
            [
                rf"\begin{{tabular}}{{{spec}}}",
                r"\toprule",
                " & ".join(latex_escape(c) for c in header) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
            ]
        )
        + "\n"
    )


def accuracy_rows(
    logs: list[Log], paths: list[Path], labels: list[str], radii: Sequence[float], alpha: float | None, rho: float
) -> list[list[str]]:
    """Two rows per log: approximate certified accuracy, and Theorem 6's lower bound on the true one."""
    rows = []
    for log, path, label in zip(logs, paths, labels, strict=True):
        hits, a = correct(log), log_alpha(log, path, alpha)
        rows.append([label, "approximate", *(f"{v:.3f}" for v in certified_accuracies(log["radius"], hits, radii))])
        bounds = true_accuracy_bounds(log["radius"], hits, radii, a, rho)
        rows.append([label, f"true ≥ (α = {a:g}, ρ = {rho:g})", *(f"{v:.3f}" for v in bounds)])
    return rows


def timing_rows(logs: list[Log], labels: list[str]) -> list[list[str]]:
    return [
        [label, str(log["time"].size), f"{np.mean(log['time']):.4f}", format_duration(float(np.sum(log["time"])))]
        for log, label in zip(logs, labels, strict=True)
    ]


def bounds_rows(
    logs: list[Log], paths: list[Path], labels: list[str], radii: Sequence[float], alpha: float | None
) -> tuple[list[list[str]], list[dict[str, np.ndarray]]]:
    """One row per (log, bound): approximate certified accuracy with that bound's radii; and the radii."""
    rows, per_log = [], []
    for log, path, label in zip(logs, paths, labels, strict=True):
        by_bound = bound_radii(log, path, log_alpha(log, path, alpha))
        per_log.append(by_bound)
        for name, bound in by_bound.items():
            rows.append([label, name, *(f"{v:.3f}" for v in certified_accuracies(bound, correct(log), radii))])
    return rows, per_log


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("logs", type=Path, nargs="+", help="certify logs (tab-separated)")
    parser.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII), help="table radii")
    parser.add_argument(
        "--labels", nargs="+", help="one name per log (default: σ=<sigma> from the logs, else their file names)"
    )
    parser.add_argument("--alpha", type=float, help="CERTIFY's α, for logs without an alpha column (default 0.001)")
    parser.add_argument("--rho", type=float, default=0.001, help="Theorem 6 holds with probability ≥ 1 − ρ")
    parser.add_argument("--out-dir", type=Path, help="where the tables and plots go (default: the first log's folder)")
    parser.add_argument("--plot", type=Path, help="curves PNG (default: OUT_DIR/certified_accuracy.png)")
    parser.add_argument("--common", action="store_true", help="only the example indices that every log holds")
    parser.add_argument(
        "--compare-bounds", action="store_true", help="also Theorem 1 vs Lecuyer et al. vs Li et al. (Figure 8, left)"
    )
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or args.logs[0].parent
    if args.labels is not None and len(args.labels) != len(args.logs):
        parser.error(f"{len(args.labels)} labels for {len(args.logs)} logs")
    return args


LOG_SUFFIXES = (".tsv", ".txt", ".log")


def default_labels(logs: list[Log], paths: list[Path]) -> list[str]:
    """``σ=<sigma>`` when each log holds a single σ and no two logs share one; else the file names, whole
    but for a .tsv/.txt/.log suffix (``Path.stem`` would turn ``sigma_0.25`` and ``sigma_0.50`` into
    ``sigma_0``); else, where names repeat, the path as given."""
    sigmas = [np.unique(log["sigma"]) if "sigma" in log else np.array([]) for log in logs]
    if all(s.size == 1 for s in sigmas) and len({float(s[0]) for s in sigmas}) == len(logs):
        return [f"σ={float(s[0]):g}" for s in sigmas]
    names = [_without_suffix(p.name) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [_without_suffix(str(p)) for p in paths]


def _without_suffix(name: str) -> str:
    for suffix in LOG_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs = [read_log(p) for p in args.logs]
    for log, path in zip(logs, args.logs, strict=True):
        if "radius" not in log or log["idx"].size == 0:
            raise SystemExit(f"{path}: not a certify log with at least one row (needs a radius column)")
    args.labels = args.labels or default_labels(logs, args.logs)
    if args.common:
        logs = common_rows(logs)
        if logs[0]["idx"].size == 0:
            raise SystemExit("--common: the logs share no example index")

    header = ["log", "accuracy", *radius_header(args.radii)]
    rows = accuracy_rows(logs, args.logs, args.labels, args.radii, args.alpha, args.rho)
    timing_header = ["log", "examples", "mean time (s)", "total time"]
    timing = timing_rows(logs, args.labels)
    acr_header = ["log", "average certified radius"]
    acr = [[label, f"{average_certified_radius(log):.3f}"] for log, label in zip(logs, args.labels, strict=True)]
    markdown = (
        f"## Certified accuracy\n\n{markdown_table(header, rows)}\n"
        f"## Average certified radius\n\n{markdown_table(acr_header, acr, label_columns=1)}\n"
        f"## Time per example\n\n{markdown_table(timing_header, timing, label_columns=1)}"
    )
    print(markdown)
    write(args.out_dir / "certified_accuracy.md", markdown)
    latex = "\n".join(
        [
            latex_table(header, rows),
            latex_table(acr_header, acr, label_columns=1),
            latex_table(timing_header, timing, 1),
        ]
    )
    write(args.out_dir / "certified_accuracy.tex", latex)
    curves = {label: (log["radius"], correct(log)) for log, label in zip(logs, args.labels, strict=True)}
    plot = args.plot or args.out_dir / "certified_accuracy.png"
    plot_curves({"certified accuracy": curves}, plot)
    print(f"wrote {plot}")

    if args.compare_bounds:
        rows, per_log = bounds_rows(logs, args.logs, args.labels, args.radii, args.alpha)
        table = markdown_table(["log", "bound", *radius_header(args.radii)], rows)
        markdown = f"## Certified accuracy under each bound\n\n{table}"
        print(markdown)
        write(args.out_dir / "bounds.md", markdown)
        panels = {
            label: {name: (radii, correct(log)) for name, radii in by_bound.items()}
            for log, label, by_bound in zip(logs, args.labels, per_log, strict=True)
        }
        plot_curves(panels, args.out_dir / "bounds.png")
        print(f"wrote {args.out_dir / 'bounds.png'}")


if __name__ == "__main__":
    main()
