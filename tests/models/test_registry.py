"""The registry: listing, finding and loading checkpoint folders by model id."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, save_checkpoint
from models.registry import (
    DEFAULT_ROOT,
    ModelNotFound,
    check_model_id,
    find_checkpoint,
    list_models,
    load_model,
)

MEAN, STD = (0.286,), (0.353,)


def save_toy(root: Path, model_id: str, sigma: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_model("fmnist_resnet", 10, MEAN, STD).eval()
    save_checkpoint(
        model,
        root / model_id,
        id=model_id,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28),
        sigma=sigma,
        normalization={"mean": list(MEAN), "std": list(STD)},
    )
    return model


@pytest.fixture()
def registry(tmp_path: Path) -> tuple[Path, dict[str, nn.Sequential]]:
    models = {
        "toy-sigma0.50": save_toy(tmp_path, "toy-sigma0.50", 0.5, seed=1),
        "toy-sigma0.25": save_toy(tmp_path, "toy-sigma0.25", 0.25, seed=2),
    }
    return tmp_path, models


def test_default_root_is_the_repository_checkpoints_folder() -> None:
    repository = Path(__file__).resolve().parents[2]
    assert repository / "checkpoints" == DEFAULT_ROOT


def test_list_models_sorted_by_id(registry: tuple[Path, dict[str, nn.Sequential]]) -> None:
    root, _ = registry
    manifests = list_models(root)
    assert [m.id for m in manifests] == ["toy-sigma0.25", "toy-sigma0.50"]
    assert [m.sigma for m in manifests] == [0.25, 0.5]


def test_load_model_gives_the_saved_model(registry: tuple[Path, dict[str, nn.Sequential]]) -> None:
    root, models = registry
    x = torch.rand(4, 1, 28, 28)
    for model_id, original in models.items():
        loaded, manifest = load_model(root, model_id)
        assert manifest.id == model_id
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), original(x), atol=0, rtol=0)


def test_find_checkpoint_returns_the_folder(registry: tuple[Path, dict[str, nn.Sequential]]) -> None:
    root, _ = registry
    assert find_checkpoint(root, "toy-sigma0.25") == root / "toy-sigma0.25"


@pytest.mark.parametrize("model_id", ["nope", "toy-sigma1.00", "../toy-sigma0.25", ".", "", "toy/../toy-sigma0.25"])
def test_unknown_id_lists_available_ids(registry: tuple[Path, dict[str, nn.Sequential]], model_id: str) -> None:
    root, _ = registry
    with pytest.raises(ModelNotFound) as error:
        load_model(root, model_id)
    assert isinstance(error.value, KeyError)
    assert error.value.model_id == model_id
    assert error.value.available == ["toy-sigma0.25", "toy-sigma0.50"]
    assert str(error.value) == (f"no model {model_id!r} in registry {root}; available: toy-sigma0.25, toy-sigma0.50")


def test_broken_folders_are_skipped_with_a_warning(
    registry: tuple[Path, dict[str, nn.Sequential]], caplog: pytest.LogCaptureFixture
) -> None:
    root, _ = registry
    (root / "bad-json").mkdir()
    (root / "bad-json" / MANIFEST_FILE).write_text("{not json")
    (root / "no-manifest").mkdir()
    (root / "no-manifest" / WEIGHTS_FILE).write_bytes(b"")
    (root / "README.md").write_text("not a model")
    (root / ".hidden").mkdir()
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        manifests = list_models(root)
    assert [m.id for m in manifests] == ["toy-sigma0.25", "toy-sigma0.50"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert any(str(root / "bad-json") in w and "invalid manifest" in w for w in warned)
    assert any(str(root / "no-manifest") in w and "manifest not found" in w for w in warned)


def test_id_must_equal_folder_name(
    registry: tuple[Path, dict[str, nn.Sequential]], caplog: pytest.LogCaptureFixture
) -> None:
    root, _ = registry
    (root / "toy-sigma0.50").rename(root / "renamed")
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        assert [m.id for m in list_models(root)] == ["toy-sigma0.25"]
    assert "renamed" in caplog.text and "differs from its folder name" in caplog.text
    with pytest.raises(CheckpointError, match="manifest id 'toy-sigma0.50' differs from its folder name 'renamed'"):
        find_checkpoint(root, "renamed")


def test_broken_model_raises_checkpoint_error_not_model_not_found(
    registry: tuple[Path, dict[str, nn.Sequential]],
) -> None:
    root, _ = registry
    manifest_path = root / "toy-sigma0.25" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256") as error:
        load_model(root, "toy-sigma0.25")
    assert str(root / "toy-sigma0.25" / WEIGHTS_FILE) in str(error.value)


def test_missing_root_is_an_empty_registry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "absent"
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        assert list_models(root) == []
    assert "does not exist" in caplog.text
    with pytest.raises(ModelNotFound, match="available: none"):
        find_checkpoint(root, "anything")


@pytest.mark.parametrize("model_id", ["cohen2019-cifar10-resnet110-sigma0.25", "a", "A_b.c+d-1"])
def test_valid_model_ids(model_id: str) -> None:
    assert check_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", ["", ".", "..", ".hidden", "a/b", "a\\b", "-x", "a b", "é"])
def test_invalid_model_ids(model_id: str) -> None:
    with pytest.raises(ValueError, match="invalid model id"):
        check_model_id(model_id)
