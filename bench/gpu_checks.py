"""The checks of a lent GPU that ``python -m bench`` does not make (issue 17 §4), and a random-weights model.

    python -m bench.gpu_checks make-model --arch cifar_resnet110 --model-dir /tmp/r110
    python -m bench.gpu_checks check --model-dir /tmp/r110 --model cifar10-resnet110-random --device cuda

``make-model`` writes a registry folder holding one classifier of a registered architecture with random
weights (CIFAR-10 shape, σ = 0.25): throughput does not depend on the weights. ``check`` reports, for a model
prepared as the service prepares it, the device's name, how often one batch of ``count_chunks`` makes the
host wait for the device (``torch.cuda.set_sync_debug_mode``: 1 expected, the copy of the counts back), and
the time of one CERTIFY with n = 100,000 (median of three, after a warm-up). bench/gpu/run.sh runs both
with ``python -m bench --device cuda --brief`` for the shipped model and this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.registry import load_model
from service.engine.models import pick_device
from smoothing.core import certify
from smoothing.sampling import ESTIMATION_STAGE, NOISE_BLOCK, Chunk, count_chunks, stream_key
from smoothing.tuning import prepare_for_inference

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


def make_random_model(root: Path, arch: str, sigma: float = 0.25, seed: int = 0) -> str:
    """Write ``root/<id>`` with a CIFAR-10 classifier of architecture ``arch`` and random weights; return the id."""
    torch.manual_seed(seed)
    model = build_model(arch, len(CIFAR_CLASSES), CIFAR_MEAN, CIFAR_STD)
    model_id = f"cifar10-{arch.removeprefix('cifar_')}-random"
    save_checkpoint(
        model,
        root / model_id,
        id=model_id,
        architecture=arch,
        dataset="cifar10",
        classes=CIFAR_CLASSES,
        input_shape=(3, 32, 32),
        sigma=sigma,
        normalization={"mean": CIFAR_MEAN, "std": CIFAR_STD},
        source={"weights": f"random (torch.manual_seed({seed})), for timing only"},
    )
    return model_id


def syncs_per_batch(
    model: torch.nn.Module, shape: tuple[int, ...], sigma: float, classes: int, chunks: int, size: int
) -> int:
    """How often one ``count_chunks`` batch of ``chunks`` chunks made the host wait for the CUDA device."""
    device = next(model.parameters()).device
    x = torch.rand(shape, device=device)
    batch = [
        Chunk(x=x, sigma=sigma, key=stream_key(k, x), stage=ESTIMATION_STAGE, start=0, stop=size // chunks)
        for k in range(chunks)
    ]
    count_chunks(model, batch, classes)  # warm-up: first-call allocations may synchronize
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            count_chunks(model, batch, classes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check(model_dir: Path, model_id: str, device: torch.device, n: int, repeats: int) -> dict[str, object]:
    model, manifest = load_model(model_dir, model_id, device)
    plan = prepare_for_inference(model, manifest.input_shape, device, cache_key=manifest.sha256)
    result: dict[str, object] = {
        "model": model_id,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "plan": {"batch_size": plan.batch_size, "precision": plan.precision, "channels_last": plan.channels_last},
    }
    if device.type == "cuda":
        result["syncs_per_batch"] = {
            f"{chunks} chunks": syncs_per_batch(
                plan.model, manifest.input_shape, manifest.sigma, manifest.num_classes, chunks, plan.batch_size
            )
            for chunks in (1, max(1, plan.batch_size // NOISE_BLOCK))
        }
    x = torch.rand(manifest.input_shape, generator=torch.Generator().manual_seed(0))
    options = dict(sigma=manifest.sigma, num_classes=manifest.num_classes, n0=100, alpha=0.001)
    options |= dict(batch_size=plan.batch_size, channels_last=plan.channels_last)
    certify(plan.model, x, n=min(n, 10 * plan.batch_size), seed=0, **options)  # warm-up
    seconds = []
    for seed in range(1, repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        certificate = certify(plan.model, x, n=n, seed=seed, **options)
        seconds.append(time.perf_counter() - started)
    result["certify"] = {"n0": 100, "n": n, "seconds": seconds, "median_s": statistics.median(seconds)}
    result["certify"]["samples_per_s"] = (100 + n) / statistics.median(seconds)
    result["certify"]["last_radius"] = certificate.radius
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("make-model", help="a registry folder with one random-weights CIFAR-10 classifier")
    make.add_argument("--arch", default="cifar_resnet110")
    make.add_argument("--model-dir", type=Path, required=True)
    run = verbs.add_parser("check", help="syncs per batch and one CERTIFY's time")
    run.add_argument("--model-dir", type=Path, required=True)
    run.add_argument("--model", required=True)
    run.add_argument("--device", default="auto")
    run.add_argument("--n", type=int, default=100_000)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    if args.verb == "make-model":
        print(make_random_model(args.model_dir, args.arch))
        return
    result = check(args.model_dir, args.model, pick_device(args.device), args.n, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
