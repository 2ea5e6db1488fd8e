"""Operators per batch on the service's path, counted with torch.profiler on the CPU: what a batch costs in
kernel launches on a GPU, where every computing operator is at least one launch.

For the shipped model in its tuned precision, at several batch sizes, for a batch of one request (one
chunk: the scheduler merges an item's consecutive ranges) and of as many requests as 128-sample chunks fit
(the most chunks a batch can hold): the operators of the noise (``noisy_batch``: one draw per 128-sample
block, a copy per partial block, one x + σ·ε per chunk), of the forward pass, and of the counting
(row ids, argmax, ``scatter_add_``, the one copy of the counts back), plus the executor's copies of the
inputs to the device (one per distinct input). Views and allocations are not counted: they launch nothing.

    python -m bench.launches --model fmnist-resnet-sigma0.25
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from bench.machine import cpuinfo_field
from models.registry import DEFAULT_ROOT, load_model
from smoothing.sampling import ESTIMATION_STAGE, NOISE_BLOCK, Chunk, count_chunks, noisy_batch, stream_key
from smoothing.tuning import prepare_for_inference

# Operators that only describe or allocate memory: no kernel runs for them.
NOT_LAUNCHES = frozenset(
    {
        *("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view"),
        *("aten::slice", "aten::select", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose"),
        *("aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::detach"),
        *("aten::detach_", "aten::alias", "aten::lift_fresh", "aten::resize_", "aten::to", "aten::contiguous"),
        *("aten::_unsafe_view", "aten::set_", "aten::result_type", "aten::_to_copy"),
    }
)
BATCH_SIZES = (128, 1024, 4096, 16384)


def launches(fn: Callable[[], object]) -> tuple[int, Counter[str]]:
    """Computing operators that ran during ``fn()`` (leaves of the profiler's operator tree): total, and by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    names = Counter(e.name for e in profile.events() if not e.cpu_children and e.name not in NOT_LAUNCHES)
    names = Counter({n: c for n, c in names.items() if n.startswith("aten::")})
    return sum(names.values()), names


def batch_of(requests: int, size: int, shape: tuple[int, ...], sigma: float) -> list[Chunk]:
    """A batch of ``size`` samples from ``requests`` inputs, as the scheduler cuts it (one chunk per request)."""
    per = size // requests
    chunks = []
    for r in range(requests):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(r))
        chunks.append(Chunk(x=x, sigma=sigma, key=stream_key(r, x), stage=ESTIMATION_STAGE, start=0, stop=per))
    return chunks


@torch.inference_mode()
def measure(model: torch.nn.Module, shape: tuple[int, ...], sigma: float, channels_last: bool) -> list[dict]:
    device = torch.device("cpu")
    rows = []
    for size in BATCH_SIZES:
        for requests in sorted({1, size // NOISE_BLOCK}):
            chunks = batch_of(requests, size, shape, sigma)
            noise, noise_ops = launches(lambda chunks=chunks: noisy_batch(chunks, device, channels_last))
            batch = noisy_batch(chunks, device, channels_last)
            forward, _ = launches(lambda batch=batch: model(batch))
            classes = model(batch[:1]).shape[1]
            whole, _ = launches(lambda c=chunks, k=classes: count_chunks(model, c, k, channels_last))
            counting = whole - noise - forward  # what count_chunks adds around the noise and the forward pass
            inputs = requests  # the executor copies each distinct input to the device once per batch
            total = noise + forward + counting + inputs
            rows.append(
                {
                    "batch_size": size,
                    "requests": requests,
                    "noise": noise,
                    "noise_draws": noise_ops["aten::normal_"],
                    "forward": forward,
                    "counting": counting,
                    "input_copies": inputs,
                    "total": total,
                    "per_1000_samples": 1000 * total / size,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-resnet-sigma0.25")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/launches.json"))
    parser.add_argument("--report", type=Path, default=Path("bench/results/launches.md"), help="in BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    model, manifest = load_model(args.model_dir, args.model, device)
    plan = prepare_for_inference(
        model, manifest.input_shape, device, cache_key=manifest.sha256, precision=args.precision
    )
    result = {
        "model": args.model,
        "command": " ".join(["python -m bench.launches", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{cpuinfo_field('model name', Path('/proc/cpuinfo').read_text())}, {os.cpu_count()} cores",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "precision": plan.precision,
        "channels_last": plan.channels_last,
        "rows": measure(plan.model, manifest.input_shape, manifest.sigma, plan.channels_last),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.report.write_text(markdown(result))


def markdown(result: dict) -> str:
    """The section of BENCHMARKS.md."""
    lines = [
        "## Operators per batch: what a batch costs in GPU kernel launches (issue 17)",
        "",
        f"`{result['command']}` ({result['machine']}, {result['date_utc'][:10]}, torch {result['torch']}; "
        f"{result['model']} in {result['precision']}): computing operators counted by torch.profiler on the CPU, "
        "each at least one kernel launch on a GPU (a cuDNN convolution may be a few). A batch of one request is one "
        "chunk (the scheduler merges an item's consecutive ranges); the other row is the most chunks a batch holds, "
        f"one {NOISE_BLOCK}-sample chunk per request. Noise: one draw per {NOISE_BLOCK}-sample block and one "
        "x + σ·ε per chunk; input copies: one per distinct input.",
        "",
        "| batch | requests | noise (draws) | forward | counting | input copies | total | per 1,000 samples |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch_size']:,} | {r['requests']} | {r['noise']} ({r['noise_draws']}) | {r['forward']} | "
            f"{r['counting']} | {r['input_copies']} | {r['total']} | {r['per_1000_samples']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
