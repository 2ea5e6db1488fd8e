"""The tiny test model of the service tests: ids, shapes, and how its weights are made."""

from __future__ import annotations

from pathlib import Path

import torch

from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.registry import load_model
from service.engine.pool import cpu_cores
from smoothing.tuning import prepare_for_inference

TINY_ID = "tiny"
TINY_SHAPE = (1, 28, 28)
TINY_SIGMA = 0.25
TINY_BATCH = 256
TINY_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def spread_predictions(model: torch.nn.Sequential) -> None:
    """Shift the last layer's biases so that noisy copies of mid-gray images split over many classes.

    A freshly initialised network gives one class to nearly every noisy sample, which would let a
    wrong count go unnoticed. Centred on mid-gray with a small lead for class 0, the counts of a
    gray image spread over all ten classes (class 0 ≈ 80 %, enough to certify), while other
    images give other mixtures, near-ties (abstentions) included.
    """
    fc = model[1].fc
    noise = torch.randn((512, *TINY_SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(0.5 + TINY_SIGMA * noise)  # (512, 10)
        fc.bias -= logits.mean(dim=0)
        fc.bias[0] += 0.04  # logits vary by ~0.015 under noise: a lead of ~2.5 standard deviations


def save_tiny_registry(root: Path) -> Path:
    """A registry folder ``root`` holding one checkpoint, id "tiny" (1×28×28, 10 classes, σ = 0.25)."""
    torch.manual_seed(0)  # the same weights in every run
    model = build_model("fmnist_resnet", len(TINY_CLASSES), (0.286,), (0.353,)).eval()
    spread_predictions(model)
    save_checkpoint(
        model,
        root / TINY_ID,
        id=TINY_ID,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=TINY_CLASSES,
        input_shape=TINY_SHAPE,
        sigma=TINY_SIGMA,
        normalization={"mean": [0.286], "std": [0.353]},
    )
    return root


def save_tuning_answer(registry: Path, path: Path) -> Path:
    """A tuning-cache file at ``path`` answering the tiny model's batch-size sweep with TINY_BATCH, at 1 and 2
    threads (plans are cached per thread count: one CPU executor with both cores, or two with one each)."""
    model, manifest = load_model(registry, TINY_ID)
    threads = torch.get_num_threads()
    for count in sorted({1, 2, cpu_cores()}):
        torch.set_num_threads(count)
        prepare_for_inference(
            model, manifest.input_shape, "cpu", cache_key=manifest.sha256, cache_file=path, candidates=(TINY_BATCH,)
        )
    torch.set_num_threads(threads)
    return path
