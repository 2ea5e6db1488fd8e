"""The tiny test model of the service tests: ids, shapes, and how its weights are made."""

from __future__ import annotations

import torch

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
