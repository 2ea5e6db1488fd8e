"""Saving and loading registry checkpoints: every failure is a CheckpointError naming the file."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    Manifest,
    Normalization,
    load_checkpoint,
    load_weights,
    manifest_digest,
    read_manifest,
    read_state_dict,
    save_checkpoint,
    sha256_of,
)

FMNIST_MEAN, FMNIST_STD = (0.286,), (0.353,)
CLASSES = [f"c{i}" for i in range(10)]


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that a lost buffer changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.num_batches_tracked.fill_(123)
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))


def fmnist_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_model("fmnist_resnet", len(CLASSES), FMNIST_MEAN, FMNIST_STD)
    randomize_batchnorm(model, seed)
    return model.eval()


def manifest_fields(model_id: str = "toy", **overrides: Any) -> dict[str, Any]:
    fields = {
        "id": model_id,
        "architecture": "fmnist_resnet",
        "dataset": "fashion-mnist",
        "classes": CLASSES,
        "input_shape": (1, 28, 28),
        "sigma": 0.25,
        "normalization": {"mean": list(FMNIST_MEAN), "std": list(FMNIST_STD)},
        "training": {"epochs": 1},
        "source": {"test": True},
    }
    return fields | overrides


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[nn.Sequential, Path]:
    model = fmnist_model()
    directory = tmp_path / "toy"
    save_checkpoint(model, directory, **manifest_fields())
    return model, directory


def rewrite_manifest(directory: Path, **changes: Any) -> None:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_roundtrip_gives_identical_outputs(saved: tuple[nn.Sequential, Path]) -> None:
    model, directory = saved
    loaded, manifest = load_checkpoint(directory)
    assert not loaded.training
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded[1].bn1.num_batches_tracked.item() == 123


def test_roundtrip_keeps_manifest(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    manifest = read_manifest(directory)
    assert manifest == Manifest(sha256=sha256_of(directory / WEIGHTS_FILE), **manifest_fields())
    assert manifest.num_classes == 10
    assert manifest.weights == WEIGHTS_FILE


def test_manifest_digest_covers_what_the_weights_hash_does_not(saved: tuple[nn.Sequential, Path]) -> None:
    """Normalization, classes, id and architecture live outside weights.pt: each changes the digest."""
    manifest = read_manifest(saved[1])
    digest = manifest_digest(manifest)
    assert digest == manifest_digest(read_manifest(saved[1])) and len(digest) == 64
    changes = [
        {"normalization": Normalization(mean=[0.5], std=[0.353])},
        {"classes": [*CLASSES[:-1], "other"]},
        {"id": "another"},
        {"sigma": 0.5},
        {"sha256": "0" * 64},
    ]
    for change in changes:
        other = manifest.model_copy(update=change)
        assert other.sha256 == manifest.sha256 or "sha256" in change
        assert manifest_digest(other) != digest, change


def test_saved_weights_are_plain_tensors(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "1.conv1.weight" in state and not [k for k in state if k.startswith("0.")]


def assert_names(error: pytest.ExceptionInfo[CheckpointError], path: Path) -> None:
    assert error.type is CheckpointError
    assert str(path) in str(error.value)
    assert "Traceback" not in str(error.value)
    assert error.value.__cause__ is None  # no torch traceback chained behind ours


def test_truncated_weights_detected_by_sha256(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="sha256") as error:
        load_checkpoint(directory)
    assert_names(error, weights)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_weights_with_matching_hash_are_unreadable(saved: tuple[nn.Sequential, Path], keep: float) -> None:
    # a file cut short before its manifest was written: the hash matches, the content does not parse
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: int(keep * len(blob))])
    rewrite_manifest(directory, sha256=sha256_of(weights))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    assert_names(error, weights)


def garbage_blobs() -> list[bytes]:
    rng = random.Random(0)
    blobs = [b"", b"\x80", b"hello world\n", b'{"1.conv1.weight": [1, 2]}', b"PK\x03\x04broken zip"]
    blobs += [bytes(rng.randrange(256) for _ in range(size)) for size in (1, 3, 7, 64, 512, 4096) for _ in range(4)]
    return blobs


@pytest.mark.parametrize("blob", garbage_blobs(), ids=lambda blob: f"{len(blob)}-bytes")
def test_garbage_bytes_raise_checkpoint_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_names(error, path)


def test_garbage_weights_through_load_checkpoint(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(b"\x00\x01not torch at all" * 100)
    rewrite_manifest(directory, sha256=sha256_of(weights))
    with pytest.raises(CheckpointError, match="not a readable|not loadable") as error:
        load_checkpoint(directory)
    assert_names(error, weights)


def test_flipped_byte_fails_sha256(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match the manifest") as error:
        load_checkpoint(directory)
    assert_names(error, weights)


def test_missing_weights_file(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="not found") as error:
        load_checkpoint(directory)
    assert_names(error, directory / WEIGHTS_FILE)


def test_wrong_architecture_names_keys(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, architecture="cifar_resnet20")
    with pytest.raises(CheckpointError, match="do not match the architecture") as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert_names(error, directory / WEIGHTS_FILE)
    assert "missing keys: 1.layer1.1." in message  # ResNet-20 has three blocks per stage, the file one
    assert "wrong shapes: 1.conv1.weight (file (16, 1, 3, 3), model (16, 3, 3, 3))" in message


def test_wrong_number_of_classes_names_fc(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, classes=["a", "b", "c"])
    with pytest.raises(CheckpointError, match=r"1\.fc\.weight \(file \(10, 64\), model \(3, 64\)\)") as error:
        load_checkpoint(directory)
    assert_names(error, directory / WEIGHTS_FILE)


def test_unknown_architecture_in_manifest(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, architecture="vgg16")
    with pytest.raises(CheckpointError, match="unknown architecture 'vgg16'"):
        load_checkpoint(directory)


def test_load_weights_reports_unexpected_and_non_tensor_values(tmp_path: Path) -> None:
    model = fmnist_model()
    state = dict(model.state_dict())
    state["1.conv1.weight"] = [1.0, 2.0]
    state["1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    with pytest.raises(CheckpointError) as error:
        load_weights(model, state, path)
    assert_names(error, path)
    assert "unexpected keys: 1.extra.weight" in str(error.value)
    assert "1.conv1.weight (file a list, not a tensor, model (16, 1, 3, 3))" in str(error.value)


def test_missing_manifest(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    (directory / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="manifest not found") as error:
        load_checkpoint(directory)
    assert_names(error, directory / MANIFEST_FILE)


@pytest.mark.parametrize(
    "text",
    ['{"id": "toy", ', "not json", "[]", '{"id": "toy"}', b"\xff\xfe\x00".decode("latin-1")],
)
def test_invalid_manifest(saved: tuple[nn.Sequential, Path], text: str) -> None:
    _, directory = saved
    (directory / MANIFEST_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="invalid manifest") as error:
        load_checkpoint(directory)
    assert_names(error, directory / MANIFEST_FILE)


def test_manifest_rejects_negative_sigma(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, sigma=-0.25)
    with pytest.raises(CheckpointError, match="sigma") as error:
        load_checkpoint(directory)
    assert_names(error, directory / MANIFEST_FILE)


def test_a_classifier_trained_without_noise_loads_but_is_not_servable_alone(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, sigma=0.0)
    _, manifest = load_checkpoint(directory)
    assert manifest.sigma == 0 and not manifest.servable
    rewrite_manifest(directory, sigma=0.0, kind="denoiser")
    with pytest.raises(CheckpointError, match="sigma must be positive for a denoiser"):
        load_checkpoint(directory)


def test_a_classifier_manifest_with_parts_is_invalid(saved: tuple[nn.Sequential, Path]) -> None:
    _, directory = saved
    rewrite_manifest(directory, parts=[{"id": "x", "role": "member", "sha256": "0" * 64}])
    with pytest.raises(CheckpointError, match="has no parts"):
        load_checkpoint(directory)


def test_manifest_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).mkdir()
    with pytest.raises(CheckpointError, match="not readable") as error:
        read_manifest(tmp_path)
    assert_names(error, tmp_path / MANIFEST_FILE)


def test_top_level_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a dict, found Tensor") as error:
        read_state_dict(path)
    assert_names(error, path)


EXECUTED: list[str] = []


def record_execution() -> None:
    EXECUTED.append("code from the checkpoint ran")


class Payload:
    """Unpickling this calls record_execution: what a malicious checkpoint would do."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return record_execution, ()


def test_objects_in_file_are_refused_without_running_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"1.conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as error:
        read_state_dict(path)
    assert_names(error, path)
    assert "record_execution" in str(error.value)  # names the refused object
    assert EXECUTED == []
