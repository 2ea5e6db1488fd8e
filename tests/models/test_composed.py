"""Composed checkpoints: a denoiser then a classifier, and ensembles, loaded through the registry as one module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from models.architectures import build_model
from models.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    manifest_digest,
    parts_digest,
    save_checkpoint,
)
from models.composed import MeanSoftmax, main, save_composed
from models.registry import list_models, load_model
from smoothing.runtime import fold_batchnorm

MEAN, STD = (0.286,), (0.353,)
CLASSES = [str(i) for i in range(10)]


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def save_part(root: Path, model_id: str, arch: str, sigma: float, seed: int, kind: str = "classifier") -> nn.Module:
    torch.manual_seed(seed)
    denoiser = kind == "denoiser"
    model = build_model(arch, 10, (0.0,) if denoiser else MEAN, (1.0,) if denoiser else STD).eval()
    if denoiser:
        nn.init.normal_(model[1].body[-2].weight, std=0.05)  # not the identity it starts as
    randomize_batchnorm(model, seed)
    save_checkpoint(
        model,
        root / model_id,
        id=model_id,
        kind=kind,
        architecture=arch,
        dataset="fashion-mnist",
        classes=CLASSES,
        input_shape=(1, 28, 28),
        sigma=sigma,
        normalization={"mean": [0.0] if denoiser else list(MEAN), "std": [1.0] if denoiser else list(STD)},
    )
    return model


@pytest.fixture()
def registry(tmp_path: Path) -> tuple[Path, dict[str, nn.Module]]:
    parts = {
        "dncnn-sigma0.25": save_part(tmp_path, "dncnn-sigma0.25", "fmnist_dncnn", 0.25, 1, kind="denoiser"),
        "clean": save_part(tmp_path, "clean", "fmnist_resnet", 0.0, 2),
        "a-sigma0.25": save_part(tmp_path, "a-sigma0.25", "fmnist_resnet", 0.25, 3),
        "b-sigma0.25": save_part(tmp_path, "b-sigma0.25", "fmnist_resnet", 0.25, 4),
        "c-sigma0.25": save_part(tmp_path, "c-sigma0.25", "fmnist_resnet", 0.25, 5),
    }
    save_composed(
        tmp_path, "denoised-sigma0.25", "sequential", [("dncnn-sigma0.25", "denoiser"), ("clean", "classifier")]
    )
    members = [("a-sigma0.25", "member"), ("b-sigma0.25", "member"), ("c-sigma0.25", "member")]
    save_composed(tmp_path, "ensemble-sigma0.25", "mean_softmax", members)
    return tmp_path, parts


def test_sequential_logits_equal_running_the_parts_in_sequence(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, parts = registry
    model, manifest = load_model(root, "denoised-sigma0.25")
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = parts["clean"](parts["dncnn-sigma0.25"](x))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(fold_batchnorm(model)(x), expected, atol=1e-4, rtol=1e-4)  # as the service tunes it
    assert manifest.kind == "composed" and manifest.sigma == 0.25 and manifest.classes == CLASSES
    assert manifest.architecture == "sequential(fmnist_dncnn+fmnist_resnet)" and not model.training


def test_ensemble_output_is_the_log_of_the_mean_softmax(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, parts = registry
    model, manifest = load_model(root, "ensemble-sigma0.25")
    assert isinstance(model, MeanSoftmax) and len(model.members) == 3
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        mean = sum(parts[k](x).softmax(1) for k in ("a-sigma0.25", "b-sigma0.25", "c-sigma0.25")) / 3
        out = model(x)
        torch.testing.assert_close(out.exp(), mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fold_batchnorm(model)(x).exp(), mean, atol=1e-5, rtol=1e-4)
    assert torch.equal(out.argmax(1), mean.argmax(1)) and manifest.sigma == 0.25


def test_the_digest_covers_every_part(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    _, manifest = load_model(root, "denoised-sigma0.25")
    assert manifest.sha256 == parts_digest("sequential", manifest.parts)
    part_shas = {p.id: p.sha256 for p in manifest.parts}
    assert part_shas == {k: json.loads((root / k / MANIFEST_FILE).read_text())["sha256"] for k in part_shas}
    text = manifest.model_dump_json()
    assert all(sha in text for sha in part_shas.values())
    other = manifest.parts[0].model_copy(update={"sha256": "0" * 64})
    assert parts_digest("sequential", [other, manifest.parts[1]]) != manifest.sha256


def test_listing_serves_composed_and_noisy_classifiers_but_not_their_parts(
    registry: tuple[Path, dict[str, nn.Module]],
) -> None:
    root, _ = registry
    servable = [m.id for m in list_models(root)]
    assert servable == ["a-sigma0.25", "b-sigma0.25", "c-sigma0.25", "denoised-sigma0.25", "ensemble-sigma0.25"]
    assert {"clean", "dncnn-sigma0.25"} <= {m.id for m in list_models(root, parts=True)}


def test_a_corrupt_part_names_the_part(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    weights = root / "b-sigma0.25" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        load_model(root, "ensemble-sigma0.25")
    message = str(error.value)
    assert "part 'b-sigma0.25' (member)" in message and "sha256" in message and str(weights) in message
    assert str(root / "ensemble-sigma0.25" / MANIFEST_FILE) in message


def test_a_retrained_part_is_refused(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    save_part(root, "clean", "fmnist_resnet", 0.0, 99)  # valid on its own, but not the pinned weights
    with pytest.raises(CheckpointError, match="part 'clean' \\(classifier\\): its sha256 .* is not the"):
        load_model(root, "denoised-sigma0.25")


def test_a_missing_part_is_named(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    (root / "dncnn-sigma0.25" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="part 'dncnn-sigma0.25' \\(denoiser\\) is not a checkpoint"):
        load_model(root, "denoised-sigma0.25")


def test_an_edited_parts_list_fails_the_digest(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    path = root / "ensemble-sigma0.25" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["parts"] = manifest["parts"][:2]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not the digest of its parts"):
        load_model(root, "ensemble-sigma0.25")


@pytest.mark.parametrize(
    ("combine", "parts", "match"),
    [
        ("sequential", [("clean", "classifier"), ("dncnn-sigma0.25", "denoiser")], "roles denoiser, classifier"),
        ("sequential", [("a-sigma0.25", "denoiser"), ("clean", "classifier")], "is a classifier, not a denoiser"),
        ("mean_softmax", [("a-sigma0.25", "member")], "two or more"),
        ("mean_softmax", [("a-sigma0.25", "member"), ("clean", "member")], "σ = 0.0"),
    ],
)
def test_parts_that_do_not_fit_are_refused(
    registry: tuple[Path, dict[str, nn.Module]], combine: str, parts: list[tuple[str, str]], match: str
) -> None:
    root, _ = registry
    with pytest.raises(CheckpointError, match=match):
        save_composed(root, "bad", combine, parts, sigma=0.25)


def test_command_line_writes_a_loadable_composed_manifest(
    registry: tuple[Path, dict[str, nn.Module]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = registry
    main(["--registry", str(root), "--id", "pair", "--combine", "mean_softmax"] + ["--part", "member=a-sigma0.25"] * 2)
    assert "wrote" in capsys.readouterr().out
    model, manifest = load_model(root, "pair")
    assert manifest.training["command"].startswith("python -m models.composed") and len(model.members) == 2


def test_the_manifest_digest_covers_every_part(registry: tuple[Path, dict[str, nn.Module]]) -> None:
    root, _ = registry
    _, manifest = load_model(root, "ensemble-sigma0.25")
    digest = manifest_digest(manifest)
    for i in range(len(manifest.parts)):
        parts = list(manifest.parts)
        parts[i] = parts[i].model_copy(update={"sha256": "0" * 64})
        assert manifest_digest(manifest.model_copy(update={"parts": parts})) != digest
