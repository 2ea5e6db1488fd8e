"""Noise-augmented training end to end on a tiny Fashion-MNIST: checkpoint, per-epoch log, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from idx_files import write_idx

from models.checkpoint import load_checkpoint
from training import train as train_module


def write_tiny_fashion_mnist(root: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, size in (("train", 96), ("t10k", 40)):
        labels = rng.integers(0, 10, size)
        # Class-dependent brightness, so that even two epochs learn something.
        images = (labels[:, None, None] * 25 + rng.integers(0, 30, (size, 28, 28))).clip(0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


def args(data: Path, out: Path, workdir: Path) -> list[str]:
    return [
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(data),
        "--arch",
        "fmnist_resnet",
        "--sigma",
        "0.25",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--workdir",
        str(workdir),
        "--seed",
        "3",
    ]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_tiny_fashion_mnist(tmp_path)
    return tmp_path


def test_training_writes_a_checkpoint_with_its_recipe_and_epoch_log(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-a"
    train_module.main(args(data, out, tmp_path / "work-a"))
    model, manifest = load_checkpoint(out)
    assert manifest.id == "model-a" and manifest.sigma == 0.25 and manifest.input_shape == (1, 28, 28)
    assert manifest.training["recipe"]["epochs"] == 2 and manifest.training["command"].startswith("train ")
    epochs = manifest.training["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(0 <= e["noisy_accuracy"] <= 1 and 0 <= e["clean_accuracy"] <= 1 and e["train_loss"] > 0 for e in epochs)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_an_interrupted_run_resumes_to_the_same_weights(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    train_module.main(args(data, straight, tmp_path / "work-straight"))

    evaluate = train_module.evaluate
    calls = {"n": 0}

    def crash_in_epoch_two(*a, **k):  # the process dies after epoch 1's state was saved
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    resumed, workdir = tmp_path / "resumed", tmp_path / "work-resumed"
    monkeypatch.setattr(train_module, "evaluate", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(args(data, resumed, workdir))
    assert (workdir / "last.pt").exists() and not resumed.exists()
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    train_module.main(args(data, resumed, workdir))

    a, _ = load_checkpoint(straight)
    b, manifest = load_checkpoint(resumed)
    assert [e["epoch"] for e in manifest.training["epochs"]] == [1, 2]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=f"{name} differs after resuming")


def test_resuming_with_another_recipe_is_refused(data: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    train_module.main(args(data, tmp_path / "m", workdir))
    other = args(data, tmp_path / "m2", workdir)
    other[other.index("--sigma") + 1] = "0.5"
    with pytest.raises(SystemExit, match="another recipe"):
        train_module.main(other)
