"""bench.model_cost on a toy registry: a classifier and an ensemble of two, which costs about twice as much."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.model_cost import main
from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.composed import save_composed


def test_prints_one_row_per_model_with_its_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, model_id in enumerate(("a", "b")):
        torch.manual_seed(seed)
        save_checkpoint(
            build_model("fmnist_resnet", 10, (0.286,), (0.353,)).eval(),
            tmp_path / model_id,
            id=model_id,
            architecture="fmnist_resnet",
            dataset="fashion-mnist",
            classes=[str(i) for i in range(10)],
            input_shape=(1, 28, 28),
            sigma=0.25,
            normalization={"mean": [0.286], "std": [0.353]},
        )
    save_composed(tmp_path, "ab", "mean_softmax", [("a", "member"), ("b", "member")])
    main(["a", "ab", "--registry", str(tmp_path), "--batch-size", "16", "--rounds", "1", "--seconds", "0.01"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["| a", "| ab"]
    assert rows[0][3] == "1.00× |" and float(rows[1][3].rstrip("× |")) > 1
