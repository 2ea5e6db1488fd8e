"""Noise-augmented training end to end on a tiny Fashion-MNIST: checkpoint, per-epoch log, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from idx_files import write_idx

from models.checkpoint import load_checkpoint
from models.composed import save_composed
from models.registry import load_model
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


def test_consistency_loss_is_cross_entropy_for_one_copy_or_no_weights() -> None:
    logits, labels = torch.randn(1, 8, 10), torch.randint(0, 10, (8,))
    plain = torch.nn.functional.cross_entropy(logits[0], labels)
    torch.testing.assert_close(train_module.consistency_loss(logits, labels, 10.0, 0.5), plain)
    two = torch.randn(2, 8, 10)
    mean_ce = (
        torch.nn.functional.cross_entropy(two[0], labels) + torch.nn.functional.cross_entropy(two[1], labels)
    ) / 2
    torch.testing.assert_close(train_module.consistency_loss(two, labels, 0.0, 0.0), mean_ce)


def test_consistency_loss_matches_jeong_and_shin() -> None:
    logits, labels = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    p = logits.softmax(2)
    mean_p = p.mean(0)
    ce = sum(torch.nn.functional.cross_entropy(logits[i], labels) for i in range(3)) / 3
    kl = sum((mean_p * (mean_p.log() - p[i].log())).sum(1) for i in range(3)) / 3
    ent = -(mean_p * mean_p.log()).sum(1)
    expected = ce + (10 * kl + 0.5 * ent).mean()
    torch.testing.assert_close(train_module.consistency_loss(logits, labels, 10.0, 0.5), expected)
    # Identical copies: the KL term vanishes and only cross-entropy and entropy are left.
    same = logits[:1].expand(3, -1, -1)
    ent_same = -(p[0] * p[0].log()).sum(1).mean()
    ce_same = torch.nn.functional.cross_entropy(logits[0], labels)
    torch.testing.assert_close(train_module.consistency_loss(same, labels, 10.0, 0.5), ce_same + 0.5 * ent_same)


def test_fine_tuning_with_consistency_records_the_recipe_and_the_initial_checkpoint(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    train_module.main(args(data, base, tmp_path / "work-base"))
    _, base_manifest = load_checkpoint(base)
    tuned = tmp_path / "tuned"
    extra = ["--noise-copies", "2", "--consistency", "10", "--entropy", "0.5", "--init", str(base)]
    extra += ["--schedule", "cosine", "--lr", "0.01", "--epochs", "1"]
    train_module.main(args(data, tuned, tmp_path / "work-tuned") + extra)
    model, manifest = load_checkpoint(tuned)
    recipe = manifest.training["recipe"]
    assert (recipe["noise_copies"], recipe["consistency"], recipe["entropy"]) == (2, 10.0, 0.5)
    assert recipe["init"] == str(base) and recipe["schedule"] == "cosine" and recipe["epochs"] == 1
    assert manifest.training["init"] == {"path": str(base), "id": "base", "sha256": base_manifest.sha256}
    assert "--consistency 10" in manifest.training["command"]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_init_from_another_architecture_is_refused(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    train_module.main(args(data, base, tmp_path / "work-base"))
    other = args(data, tmp_path / "m", tmp_path / "work-m")
    other[other.index("--arch") + 1] = "cifar_resnet20"
    with pytest.raises(SystemExit, match="--init"):
        train_module.main([*other, "--init", str(base)])


@pytest.mark.parametrize("objective", ["mse", "stability"])
def test_a_denoiser_for_a_clean_classifier_composes_with_it(data: Path, tmp_path: Path, objective: str) -> None:
    registry = tmp_path / "registry"
    clean = args(data, registry / "clean", tmp_path / "work-clean")
    clean[clean.index("--sigma") + 1] = "0"
    train_module.main(clean)
    _, clean_manifest = load_checkpoint(registry / "clean")
    assert clean_manifest.sigma == 0 and not clean_manifest.servable

    denoiser = args(data, registry / "dncnn", tmp_path / "work-dncnn")
    denoiser[denoiser.index("--arch") + 1] = "fmnist_dncnn"
    denoiser += ["--denoiser-for", str(registry / "clean"), "--objective", objective, "--optimizer", "adam"]
    denoiser += ["--lr", "0.001", "--weight-decay", "0", "--schedule", "cosine"]
    train_module.main(denoiser)
    model, manifest = load_checkpoint(registry / "dncnn")
    assert manifest.kind == "denoiser" and manifest.sigma == 0.25 and manifest.normalization.mean == [0.0]
    assert manifest.training["classifier"] == {
        "path": str(registry / "clean"),
        "id": "clean",
        "sha256": clean_manifest.sha256,
    }
    assert manifest.training["recipe"]["objective"] == objective
    last = manifest.training["epochs"][-1]
    assert last["denoised_mse"] >= 0 and abs(last["noisy_mse"] - 0.25**2) < 0.01
    if objective == "mse":  # two epochs already denoise better than doing nothing
        assert last["denoised_mse"] < last["noisy_mse"]
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == x.shape

    save_composed(registry, "denoised", "sequential", [("dncnn", "denoiser"), ("clean", "classifier")])
    composed, composed_manifest = load_model(registry, "denoised")
    assert composed_manifest.sigma == 0.25 and composed(x).shape == (2, 10)


def test_a_denoiser_needs_an_architecture_that_outputs_images(data: Path, tmp_path: Path) -> None:
    train_module.main(args(data, tmp_path / "clean", tmp_path / "work-clean"))
    denoiser = args(data, tmp_path / "d", tmp_path / "work-d") + ["--denoiser-for", str(tmp_path / "clean")]
    with pytest.raises(SystemExit, match="not a denoiser"):
        train_module.main(denoiser)
