"""Cost per noise sample of registry models, composed ones included, measured side by side.

    python -m bench.model_cost fmnist-resnet-sigma0.25 fmnist-ensemble-sigma0.25 --threads 1

Each model is loaded through the registry, BatchNorm folded, and timed (noise + forward + argmax,
``smoothing.tuning.measure_throughput``) at one batch size and the default memory format, in
``--rounds`` rounds that cycle through the models so that a change of machine load hits them
alike; the median round is reported as samples/s and μs per sample, and relative to the first model.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from models.registry import DEFAULT_ROOT, load_model
from smoothing.runtime import fold_batchnorm
from smoothing.tuning import measure_throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model ids; the first is the reference")
    parser.add_argument("--registry", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model per round")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = {}
    for model_id in args.models:
        model, manifest = load_model(args.registry, model_id)
        loaded[model_id] = (fold_batchnorm(model), tuple(manifest.input_shape))
    rates: dict[str, list[float]] = {model_id: [] for model_id in args.models}
    for _ in range(args.rounds):
        for model_id, (model, shape) in loaded.items():
            rates[model_id].append(
                measure_throughput(model, shape, args.batch_size, False, torch.device("cpu"), args.seconds)
            )
    reference = statistics.median(rates[args.models[0]])
    print(f"| model | samples/s | μs per sample | cost vs {args.models[0]} |\n| :-- | --: | --: | --: |")
    for model_id, values in rates.items():
        rate = statistics.median(values)
        print(f"| {model_id} | {rate:,.0f} | {1e6 / rate:.0f} | {reference / rate:.2f}× |")


if __name__ == "__main__":
    main()
