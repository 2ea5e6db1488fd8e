"""Run CERTIFY or PREDICT (Cohen et al. 2019, §3.2) over a test set and log one row per example.

    certify --model fmnist-resnet-sigma0.25 --skip 20 --max 500 --out logs/fmnist-0.25.tsv
    predict --model fmnist-resnet-sigma0.25 --n 1000 --out logs/fmnist-0.25-predict.tsv

The log is tab-separated with a header, in the paper's column order:

- certify: ``idx label predict radius correct time`` and then ``count_a n sigma alpha``
  (ĉA's count among the n estimation samples, and the σ and α used: enough for ``analyze
  --compare-bounds`` to recompute p̲A and the radii of other bounds).
- predict: ``idx label predict correct time``.

An abstention is written as predict = -1 (radius 0.0, correct 0); ``time`` is wall-clock
seconds for the example (the paper wrote H:MM:SS.ffffff; ``analyze`` reads both).

Examples are the indices 0, k, 2k, … (k = ``--skip``), at most ``--max`` of them. Example
``idx`` is sampled with seed ``example_seed(--seed, idx)``, so a single row can be reproduced
alone: ``smoothing.core.certify(model, dataset[idx][0], seed=example_seed(seed, idx), ...)``
with the model prepared the same way (BatchNorm folded) gives the same counts, up to float
rounding when the batch size differs. Each row is flushed as soon as it is known, so a killed
run keeps its rows; ``--resume`` skips the indices already in the log.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import CheckpointError
from models.registry import DEFAULT_ROOT, ModelNotFound, load_model
from smoothing import core
from smoothing.runtime import fold_batchnorm, with_precision
from smoothing.sampling import derive_seed
from smoothing.tuning import prepare_for_inference
from training.analyze import read_log
from training.data import DatasetNotFound, load_dataset

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "count_a", "n", "sigma", "alpha")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
ABSTAIN = -1


@dataclass(frozen=True)
class Smoothed:
    """A base classifier ready for sampling, and the CERTIFY/PREDICT settings every example shares."""

    model: nn.Module
    sigma: float
    num_classes: int
    batch_size: int
    channels_last: bool
    n: int  # estimation samples
    alpha: float
    seed: int  # the run's seed; example idx samples with example_seed(seed, idx)
    n0: int = 0  # selection samples (CERTIFY only)


def example_seed(seed: int, idx: int) -> int:
    """The 63-bit sampling seed of example ``idx`` in a run started with ``--seed seed``.

    A hash rather than seed + idx, so that runs with nearby seeds share no example's noise.
    """
    return derive_seed("example", seed, idx)


def selected_indices(size: int, skip: int, max_examples: int) -> list[int]:
    """Indices 0, skip, 2·skip, … below ``size``, at most ``max_examples`` of them."""
    if skip < 1 or max_examples < 0:
        raise ValueError(f"need skip >= 1 and max >= 0, got skip={skip}, max={max_examples}")
    return list(range(0, size, skip))[:max_examples]


def certify_row(smoothed: Smoothed, x: torch.Tensor, label: int, idx: int) -> dict[str, object]:
    """CERTIFY one example; the log row as a dict of column → value."""
    started = time.perf_counter()
    cert = core.certify(
        smoothed.model,
        x,
        sigma=smoothed.sigma,
        num_classes=smoothed.num_classes,
        n0=smoothed.n0,
        n=smoothed.n,
        alpha=smoothed.alpha,
        batch_size=smoothed.batch_size,
        seed=example_seed(smoothed.seed, idx),
        channels_last=smoothed.channels_last,
    )
    elapsed = time.perf_counter() - started
    predicted = ABSTAIN if cert.abstained else cert.label
    return {
        "idx": idx,
        "label": label,
        "predict": predicted,
        "radius": f"{cert.radius:.4f}",
        "correct": int(predicted == label),
        "time": f"{elapsed:.4f}",
        "count_a": cert.n_a,
        "n": cert.n,
        "sigma": smoothed.sigma,
        "alpha": smoothed.alpha,
    }


def predict_row(smoothed: Smoothed, x: torch.Tensor, label: int, idx: int) -> dict[str, object]:
    """PREDICT one example; the log row as a dict of column → value."""
    started = time.perf_counter()
    pred = core.predict(
        smoothed.model,
        x,
        sigma=smoothed.sigma,
        num_classes=smoothed.num_classes,
        n=smoothed.n,
        alpha=smoothed.alpha,
        batch_size=smoothed.batch_size,
        seed=example_seed(smoothed.seed, idx),
        channels_last=smoothed.channels_last,
    )
    elapsed = time.perf_counter() - started
    predicted = ABSTAIN if pred.abstained else pred.label
    return {
        "idx": idx,
        "label": label,
        "predict": predicted,
        "correct": int(predicted == label),
        "time": f"{elapsed:.4f}",
    }


def open_log(path: Path, columns: tuple[str, ...], resume: bool, settings: dict[str, float]) -> tuple[TextIO, set[int]]:
    """Open the log for appending; return it and the indices it already holds.

    Without ``resume`` the log is started afresh (like the paper's script). With it, an existing
    log must have the same columns and, in the columns named in ``settings``, the same values
    (rows made with another n, σ or α must not be mixed); a last line cut off by a kill is dropped.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (resume and path.exists() and path.stat().st_size > 0):
        f = path.open("w")
        f.write("\t".join(columns) + "\n")
        f.flush()
        return f, set()
    text = path.read_text()
    if not text.endswith("\n"):  # the run died mid-write: keep only whole rows
        path.write_text(text[: text.rfind("\n") + 1])
    log = read_log(path)
    if tuple(log) != columns:
        raise SystemExit(f"{path}: cannot resume, its columns {tuple(log)} are not {columns}")
    for name, value in settings.items():
        if np.any(log[name] != value):
            raise SystemExit(
                f"{path}: cannot resume, its rows have {name} = {np.unique(log[name]).tolist()}, this run {value}"
            )
    return path.open("a"), {int(i) for i in log["idx"]}


def write_row(f: TextIO, row: dict[str, object], columns: tuple[str, ...]) -> None:
    f.write("\t".join(str(row[c]) for c in columns) + "\n")
    f.flush()  # a killed run keeps every finished row


def prepare_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int | None,
    device: str,
    cache_key: str,
    precision: str = "float32",
) -> tuple[nn.Module, int, bool]:
    """(model, batch size, channels_last): measured by ``prepare_for_inference`` when ``batch_size`` is
    None, else the given batch size with BatchNorm folded and the default memory format (no timing, so
    two runs compute exactly the same thing). ``precision`` as in ``prepare_for_inference``."""
    if batch_size is None:
        plan = prepare_for_inference(model, input_shape, device, cache_key=cache_key, precision=precision)
        return plan.model, plan.batch_size, plan.channels_last
    fixed = "float32" if precision == "auto" else precision
    return with_precision(fold_batchnorm(model), fixed, torch.device(device)), batch_size, False


def summary(path: Path, mode: str) -> str:
    """One paragraph on the whole log: examples, accuracy, abstentions and time."""
    log = read_log(path)
    m = len(log["idx"])
    if m == 0:
        return f"{mode}: no examples in {path}"
    seconds = log["time"]
    what = "certified accuracy at r = 0" if mode == "certify" else "accuracy"
    return (
        f"{mode}: {m} examples in {path}; {what} {np.mean(log['correct']):.4f}, "
        f"abstained {np.mean(log['predict'] == ABSTAIN):.4f}; mean time {np.mean(seconds):.4f} s per example, "
        f"total {datetime.timedelta(seconds=round(float(np.sum(seconds))))}"
    )


def run(args: argparse.Namespace) -> None:
    """Load the model and the dataset, then CERTIFY/PREDICT every selected example into ``args.out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, manifest = load_model(args.registry, args.model, args.device)
    model, batch_size, channels_last = prepare_model(
        model, tuple(manifest.input_shape), args.batch_size, args.device, manifest.sha256, args.precision
    )
    sigma = manifest.sigma if args.sigma is None else args.sigma
    if sigma <= 0:
        raise SystemExit(
            f"{args.mode}: {args.model} was trained without noise (σ = 0); give the σ to smooth at, --sigma"
        )
    smoothed = Smoothed(
        model,
        sigma,
        manifest.num_classes,
        batch_size,
        channels_last,
        n=args.n,
        alpha=args.alpha,
        seed=args.seed,
        n0=args.n0,
    )
    split = args.split or ("val" if manifest.dataset == "imagenet" else "test")
    dataset = load_dataset(manifest.dataset, split, args.data_root)
    columns, make_row = (CERTIFY_COLUMNS, certify_row) if args.mode == "certify" else (PREDICT_COLUMNS, predict_row)

    settings = {"n": smoothed.n, "sigma": smoothed.sigma, "alpha": smoothed.alpha} if args.mode == "certify" else {}
    log, done = open_log(args.out, columns, args.resume, settings)
    todo = [i for i in selected_indices(len(dataset), args.skip, args.max) if i not in done]
    hits = 0
    with log, tqdm(todo, desc=f"{args.mode} {args.model} (batch {batch_size})", unit="example") as progress:
        for count, idx in enumerate(progress, start=1):
            x, label = dataset[idx]
            row = make_row(smoothed, x, int(label), idx)
            write_row(log, row, columns)
            hits += row["correct"]
            progress.set_postfix({"certified" if args.mode == "certify" else "correct": f"{hits}/{count}"})
    print(summary(args.out, args.mode), flush=True)


def batch_size_arg(text: str) -> int | None:
    """``auto`` (None: measure it) or a positive integer."""
    if text == "auto":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be positive or 'auto', got {text}")
    return value


def parse_args(mode: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=mode, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model id in the registry")
    parser.add_argument("--registry", type=Path, default=DEFAULT_ROOT, help="registry folder (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, help="local dataset folder (Fashion-MNIST has a default)")
    parser.add_argument("--split", help="dataset split (default: test; val for ImageNet)")
    parser.add_argument("--skip", type=int, default=20, help="use every k-th example: indices 0, k, 2k, …")
    parser.add_argument("--max", type=int, default=500, help="stop after this many examples")
    if mode == "certify":
        parser.add_argument("--n0", type=int, default=100, help="selection samples")
    else:
        parser.set_defaults(n0=0)
    parser.add_argument("--n", type=int, default=10_000 if mode == "certify" else 1_000, help="estimation samples")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=None,
        metavar="auto|B",
        help="samples per forward pass (default auto: measured)",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        help="smooth at this σ instead of the model's own (e.g. a classifier trained without noise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed; example idx uses example_seed(seed, idx)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16", "auto"),
        default="float32",
        help="base classifier arithmetic (default float32, the checkpoint as trained; auto: "
        "bfloat16 where measured faster)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, skip their indices")
    parser.add_argument("--out", type=Path, required=True, help="log file to write (tab-separated)")
    parser.set_defaults(mode=mode)
    return parser.parse_args(argv)


def main(mode: str, argv: list[str] | None) -> None:
    args = parse_args(mode, argv)
    try:
        run(args)
    except (ModelNotFound, CheckpointError, DatasetNotFound) as e:
        raise SystemExit(f"{mode}: {e}") from None


def main_certify(argv: list[str] | None = None) -> None:
    main("certify", argv)


def main_predict(argv: list[str] | None = None) -> None:
    main("predict", argv)


if __name__ == "__main__":
    main_certify()
