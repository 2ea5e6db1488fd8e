"""bench.launches on a tiny model: the operator counts follow the blocks and chunks of a batch."""

from __future__ import annotations

import torch
from torch import nn

from bench.launches import launches, measure
from smoothing.sampling import NOISE_BLOCK


def test_counts_follow_blocks_and_chunks() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    rows = {(r["batch_size"], r["requests"]): r for r in measure(model, (1, 4, 4), 0.25, channels_last=False)}
    alone, crowded = rows[(1024, 1)], rows[(1024, 1024 // NOISE_BLOCK)]
    assert alone["noise_draws"] == crowded["noise_draws"] == 1024 // NOISE_BLOCK
    assert alone["noise"] == 8 + 1 and crowded["noise"] == 8 + 8  # one x + σ·ε per chunk
    assert alone["forward"] == crowded["forward"] > 0  # the forward pass does not care who shares the batch
    assert crowded["input_copies"] == 8 and alone["total"] < crowded["total"]


def test_views_are_not_counted() -> None:
    x, y = torch.zeros(4, 4), torch.ones(4, 4)
    assert launches(lambda: x.view(16).reshape(4, 4).t().unsqueeze(0))[0] == 0
    total, names = launches(lambda: x.t() + y)
    assert total == 1 and set(names) == {"aten::add"}
