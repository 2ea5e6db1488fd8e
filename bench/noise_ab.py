"""The noise construction's cost: library CERTIFY throughput over L, for three ways of drawing the noise.

1. Before issue 10: blocks of 32 samples, each from PyTorch's CPU generator seeded with a 63-bit hash
   (of which that generator keeps 32 bits: blocks of one request could collide), drawn into a
   temporary and added into the batch block by block.
2. Issue 10's first version: blocks of 128 samples keyed by 128 bits (``smoothing.sampling.block_generator``),
   still a temporary and an add per block, on the calling thread only.
3. Now (``smoothing.sampling.noisy_batch``): the same 128-bit blocks drawn straight into the batch,
   then one x + σ·ε per chunk. (Sharing the blocks out among the intra-op threads on a thread pool was
   tried: 0.997 of one thread, paired over 80 rounds, so it was dropped.)

All variants run in alternating rounds of one process, each round between two L windows, so a shared
machine's drift cancels out in the ratios.

    python -m bench.noise_ab --model fmnist-resnet-sigma0.25 --rounds 5 --seconds 15
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.compute_thread import on_compute_thread, start_compute_thread
from bench.library import certify_for
from bench.limit import Limit, limit_rate
from bench.machine import cpuinfo_field
from models.registry import DEFAULT_ROOT, load_model
from smoothing import sampling
from smoothing.runtime import keep_freed_memory
from smoothing.sampling import Chunk, derive_seed
from smoothing.tuning import prepare_for_inference

NoiseFn = Callable[[int, int, int, tuple[int, ...], torch.device], torch.Tensor]
BatchFn = Callable[[list[Chunk], torch.device, bool], torch.Tensor]


def torch_block_noise(key: int, stage: int, block: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The construction before issue 10: a torch.Generator seeded per block (CPU: 32 bits of the seed kept)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed("block", key, stage, block))
    return torch.randn((sampling.NOISE_BLOCK, *shape), generator=generator, device=device)


def per_block_batch(block_noise: NoiseFn) -> BatchFn:
    """``noisy_batch`` as it was up to issue 10's first version: per piece a block in a temporary, then an add."""

    def noisy_batch(chunks: list[Chunk], device: torch.device, channels_last: bool = False) -> torch.Tensor:
        shape = tuple(chunks[0].x.shape)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        batch = torch.empty((sum(c.size for c in chunks), *shape), device=device, memory_format=memory_format)
        for c, block, lo, hi, row in sampling._noise_pieces(chunks):
            noise = block_noise(c.key, c.stage, block, shape, device)
            offset = block * sampling.NOISE_BLOCK
            torch.add(c.x.to(device), noise[lo - offset : hi - offset], alpha=c.sigma, out=batch[row : row + hi - lo])
        return batch

    return noisy_batch


VARIANTS: dict[str, tuple[BatchFn, int]] = {
    "torch mt19937 seeded per 32-sample block, temporary + add (before issue 10)": (
        per_block_batch(torch_block_noise),
        32,
    ),
    "128-bit keys, 128-sample blocks drawn into the batch (now)": (sampling.noisy_batch, 128),
}


def run_variant(name: str, limit: Limit, images: torch.Tensor, seconds: float, n0: int, n: int) -> float:
    """Library samples/s with the noise construction ``name`` (patched into smoothing.sampling for the call)."""
    noisy_batch, block = VARIANTS[name]
    saved = sampling.noisy_batch, sampling.NOISE_BLOCK
    sampling.noisy_batch, sampling.NOISE_BLOCK = noisy_batch, block
    try:
        samples, elapsed, _ = on_compute_thread(
            certify_for, limit, images, seconds, n0=n0, n=n, alpha=0.001, first_seed=1
        )
    finally:
        sampling.noisy_batch, sampling.NOISE_BLOCK = saved
    return samples / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-resnet-sigma0.25")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=15.0, help="per variant and round")
    parser.add_argument("--limit-seconds", type=float, default=3.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/noise_ab.json"))
    parser.add_argument(
        "--report", type=Path, default=Path("bench/results/noise_ab.md"), help="included in BENCHMARKS.md"
    )
    args = parser.parse_args(argv)
    keep_freed_memory()
    start_compute_thread()
    device = torch.device("cpu")
    model, manifest = load_model(args.model_dir, args.model, device)
    plan = on_compute_thread(
        prepare_for_inference,
        model,
        manifest.input_shape,
        device,
        cache_key=manifest.sha256,
        precision=args.precision,
    )
    limit = Limit(manifest, model, plan, plan.model, plan.precision, device)
    images = torch.rand((8, *manifest.input_shape), generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, object]] = []
    load_at_start = os.getloadavg()[0]
    before = limit_rate(limit, args.limit_seconds)
    for r in range(args.rounds):
        names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            rate = run_variant(name, limit, images, args.seconds, n0=100, n=10_000)
            after = limit_rate(limit, args.limit_seconds)
            rows.append(
                {"round": r, "variant": name, "samples_per_s": rate, "fraction_of_limit": rate / ((before + after) / 2)}
            )
            before = after
            print(f"round {r}: {name}: {rate:,.0f} samples/s = {rows[-1]['fraction_of_limit']:.3f} L", flush=True)
    summary = {
        name: {
            "median_fraction_of_limit": statistics.median(
                row["fraction_of_limit"] for row in rows if row["variant"] == name
            ),
            "median_samples_per_s": statistics.median(row["samples_per_s"] for row in rows if row["variant"] == name),
        }
        for name in VARIANTS
    }
    first = list(VARIANTS)[0]
    by_round = {
        r: {row["variant"]: row["fraction_of_limit"] for row in rows if row["round"] == r} for r in range(args.rounds)
    }
    for name in list(VARIANTS)[1:]:
        summary[name]["paired_ratio_to_first"] = statistics.median(v[name] / v[first] for v in by_round.values())
    result = {
        "model": args.model,
        "command": "python -m bench.noise_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpuinfo_field('model name', Path('/proc/cpuinfo').read_text())}, {os.cpu_count()} cores",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": load_at_start,
        "precision": plan.precision,
        "batch_size": plan.batch_size,
        "summary": summary,
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.report.write_text(markdown(result))
    print(json.dumps(summary, indent=2))


def markdown(result: dict) -> str:
    """The section of BENCHMARKS.md: each construction's library CERTIFY rate over L, and paired against the first."""
    first = next(iter(result["summary"]))
    lines = [
        "## Noise construction: library CERTIFY over L (issue 10)",
        "",
        f"`{result['command']}` ({result['machine']}, {result['date_utc'][:10]}, load average "
        f"{result['load_average_at_start']:.2f} at the start; {result['model']} in {result['precision']}, batch "
        f"{result['batch_size']}; library CERTIFY with n0 = 100, n = 10,000; variants alternate within each round, "
        "each between two L windows). Shared machines drift by tens of percent over seconds: read the medians and "
        "the paired ratios, not single rounds.",
        "",
        "| noise construction | median samples/s | median fraction of L | paired ÷ first (median) |",
        "|---|--:|--:|--:|",
    ]
    for name, s in result["summary"].items():
        paired = "—" if name == first else f"{s['paired_ratio_to_first']:.3f}"
        lines.append(f"| {name} | {s['median_samples_per_s']:,.0f} | {s['median_fraction_of_limit']:.3f} | {paired} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
