"""training/certify.py end to end: a tiny model in a tmp registry, a tiny Fashion-MNIST in a tmp folder."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from idx_files import write_idx

from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.registry import load_model
from smoothing import core, tuning
from smoothing.runtime import fold_batchnorm
from training import certify as certify_module
from training.analyze import read_log
from training.certify import (
    CERTIFY_COLUMNS,
    PREDICT_COLUMNS,
    batch_size_arg,
    example_seed,
    main_certify,
    main_predict,
    selected_indices,
)
from training.data import FASHION_MNIST_CLASSES, fashion_mnist

SIGMA = 0.5
NUM_EXAMPLES = 12
FAST = ["--n0", "8", "--n", "64", "--batch-size", "32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(registry root holding model "tiny", data root holding a 12-image Fashion-MNIST test split)."""
    root = tmp_path_factory.mktemp("certify")
    torch.manual_seed(0)
    model = build_model("fmnist_resnet", 10, (0.286,), (0.353,))
    with torch.no_grad():  # an untrained net says one class whatever the noise; spread its logits
        model[1].fc.bias.zero_()
        model[1].fc.weight.normal_(0, 1)
    save_checkpoint(
        model.eval(),
        root / "registry" / "tiny",
        id="tiny",
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        input_shape=(1, 28, 28),
        sigma=SIGMA,
        normalization={"mean": [0.286], "std": [0.353]},
    )
    data = root / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (NUM_EXAMPLES, 28, 28), dtype=np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", (np.arange(NUM_EXAMPLES) % 10).astype(np.uint8))
    return root / "registry", data


def run(mode: str, setup: tuple[Path, Path], out: Path, *extra: str) -> dict[str, np.ndarray]:
    registry, data = setup
    main = main_certify if mode == "certify" else main_predict
    main(["--model", "tiny", "--registry", str(registry), "--data-root", str(data), "--out", str(out), *extra])
    return read_log(out)


def rows_without_time(path: Path) -> list[list[str]]:
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    time_column = lines[0].index("time")
    return [cells[:time_column] + cells[time_column + 1 :] for cells in lines]


def test_selected_indices_follow_skip_then_max() -> None:
    assert selected_indices(10, 3, 500) == [0, 3, 6, 9]
    assert selected_indices(10, 3, 2) == [0, 3]
    assert selected_indices(4, 1, 500) == [0, 1, 2, 3]
    assert selected_indices(10, 3, 0) == []
    with pytest.raises(ValueError):
        selected_indices(10, 0, 5)


def test_example_seed_depends_on_run_seed_and_index() -> None:
    seeds = {example_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**63 for s in seeds)
    assert example_seed(7, 3) == example_seed(7, 3)


def test_batch_size_arg() -> None:
    assert batch_size_arg("auto") is None
    assert batch_size_arg("64") == 64
    with pytest.raises(Exception, match="positive"):
        batch_size_arg("0")


def test_certify_log_rows(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "logs" / "tiny.tsv"
    log = run("certify", setup, out, "--skip", "3", *FAST)
    lines = out.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == CERTIFY_COLUMNS
    np.testing.assert_array_equal(log["idx"], [0, 3, 6, 9])
    np.testing.assert_array_equal(log["label"], [0, 3, 6, 9])  # labels are idx % 10
    np.testing.assert_array_equal(log["correct"], log["predict"] == log["label"])
    certified = log["predict"] != -1
    assert certified.any()
    assert np.all(log["radius"][certified] > 0) and np.all(log["radius"][~certified] == 0)
    assert np.all((log["count_a"] >= 0) & (log["count_a"] <= 64)) and np.all(log["n"] == 64)
    assert np.all(log["sigma"] == SIGMA) and np.all(log["alpha"] == 0.001)
    assert all(re.fullmatch(r"\d+\.\d{4}", line.split("\t")[5]) for line in lines[1:])
    summary = capsys.readouterr().out
    assert "4 examples" in summary and "certified accuracy" in summary and "mean time" in summary


def test_sigma_overrides_the_models_own(setup: tuple[Path, Path], tmp_path: Path) -> None:
    log = run("certify", setup, tmp_path / "x.tsv", "--skip", "4", "--sigma", "0.125", *FAST)
    assert np.all(log["sigma"] == 0.125)
    certified = log["predict"] != -1
    assert np.all(log["radius"][certified] <= 0.125 * 3.2)  # σ·Φ⁻¹(p̲A) with p̲A < 1 - 1e-3 at n = 64


def test_certify_stops_after_max_examples(setup: tuple[Path, Path], tmp_path: Path) -> None:
    log = run("certify", setup, tmp_path / "x.tsv", "--skip", "2", "--max", "3", *FAST)
    np.testing.assert_array_equal(log["idx"], [0, 2, 4])


def test_certify_row_is_reproducible_alone(setup: tuple[Path, Path], tmp_path: Path) -> None:
    log = run("certify", setup, tmp_path / "x.tsv", "--skip", "5", "--seed", "11", *FAST)
    registry, data = setup
    model, _ = load_model(registry, "tiny")
    model = fold_batchnorm(model)
    dataset = fashion_mnist("test", data)
    for row, idx in enumerate(log["idx"].astype(int)):
        cert = core.certify(
            model,
            dataset[idx][0],
            sigma=SIGMA,
            num_classes=10,
            n0=8,
            n=64,
            alpha=0.001,
            batch_size=32,
            seed=example_seed(11, idx),
        )
        assert cert.n_a == log["count_a"][row]
        assert (-1 if cert.abstained else cert.label) == log["predict"][row]
        assert round(cert.radius, 4) == log["radius"][row]


def test_certify_is_deterministic_given_the_seed(setup: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["--skip", "1", "--max", "6", *FAST]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run("certify", setup, tmp_path / f"{name}.tsv", "--seed", seed, *args)
    assert rows_without_time(tmp_path / "a.tsv") == rows_without_time(tmp_path / "b.tsv")
    # The tiny model's counts vary with the noise, so another seed changes some count.
    assert rows_without_time(tmp_path / "a.tsv") != rows_without_time(tmp_path / "c.tsv")


def test_resume_keeps_rows_and_adds_the_missing(setup: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.tsv"
    run("certify", setup, out, "--skip", "3", "--max", "2", *FAST)
    first = out.read_text()
    with out.open("a") as f:
        f.write("6\t6\t")  # a row cut off by a kill
    log = run("certify", setup, out, "--skip", "3", "--resume", *FAST)
    np.testing.assert_array_equal(log["idx"], [0, 3, 6, 9])
    assert out.read_text().startswith(first)  # earlier rows untouched, times included


def test_without_resume_the_log_starts_afresh(setup: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.tsv"
    run("certify", setup, out, "--skip", "3", *FAST)
    log = run("certify", setup, out, "--skip", "5", *FAST)
    np.testing.assert_array_equal(log["idx"], [0, 5, 10])


def test_resume_refuses_a_log_of_another_kind(setup: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.tsv"
    run("predict", setup, out, "--max", "1", "--n", "64", "--batch-size", "32")
    with pytest.raises(SystemExit, match="cannot resume, its columns"):
        run("certify", setup, out, "--resume", *FAST)


def test_resume_refuses_other_settings(setup: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.tsv"
    run("certify", setup, out, "--max", "1", *FAST)
    with pytest.raises(SystemExit, match=r"cannot resume, its rows have n = \[64\.0\], this run 32"):
        run("certify", setup, out, "--resume", "--max", "2", "--n0", "8", "--n", "32", "--batch-size", "32")


def test_abstentions_are_written_as_minus_one(setup: tuple[Path, Path], tmp_path: Path) -> None:
    # With n = 8 and α = 0.001, p̲A ≤ 0.001^(1/8) ≈ 0.42 < 1/2: CERTIFY must abstain on every example.
    log = run("certify", setup, tmp_path / "x.tsv", "--skip", "4", "--n0", "8", "--n", "8", "--batch-size", "8")
    assert log["idx"].size == 3
    assert np.all(log["predict"] == -1) and np.all(log["radius"] == 0) and np.all(log["correct"] == 0)


def test_predict_log(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.tsv"
    log = run("predict", setup, out, "--skip", "4", "--n", "64", "--batch-size", "16")
    assert tuple(out.read_text().splitlines()[0].split("\t")) == PREDICT_COLUMNS
    np.testing.assert_array_equal(log["idx"], [0, 4, 8])
    np.testing.assert_array_equal(log["correct"], log["predict"] == log["label"])
    assert np.any(log["predict"] != -1)
    # Two samples all of one class give p = 2·2⁻⁸ > α: PREDICT abstains.
    log = run("predict", setup, out, "--skip", "4", "--n", "8", "--batch-size", "8")
    assert np.all(log["predict"] == -1)
    assert "accuracy 0.0000" in capsys.readouterr().out


def test_auto_batch_size_uses_the_inference_plan(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A two-size sweep keeps the measurement short; the real default sweeps 16 … 1024.
    monkeypatch.setattr(
        certify_module, "prepare_for_inference", functools.partial(tuning.prepare_for_inference, candidates=(16, 24))
    )
    log = run("certify", setup, tmp_path / "x.tsv", "--skip", "6", "--n0", "8", "--n", "64")
    assert log["idx"].size == 2
    assert re.search(r"\(batch (16|24)\)", capsys.readouterr().err)


def test_unknown_model_exits_with_the_available_ids(setup: tuple[Path, Path], tmp_path: Path) -> None:
    registry, data = setup
    with pytest.raises(SystemExit, match="tiny"):
        main_certify(
            ["--model", "nope", "--registry", str(registry), "--data-root", str(data), "--out", str(tmp_path / "x.tsv")]
        )
