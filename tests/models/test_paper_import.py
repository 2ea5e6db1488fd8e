"""Importing Cohen et al.'s published checkpoints: same logits as the network they saved.

The paper-format models are built here from the architecture's description (He et al.'s CIFAR
ResNet as Cohen et al. used it; torchvision's ResNet-50 in DataParallel for ImageNet), not from
our classes, so that a naming or wiring difference between the two shows up as different logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from models.architectures import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from models.checkpoint import MANIFEST_FILE, CheckpointError
from models.paper_import import (
    CIFAR10_CLASSES,
    PAPER,
    convert_state_dict,
    default_model_id,
    import_paper_checkpoint,
    infer_sigma,
    main,
)
from models.registry import list_models, load_model


class PaperNormalize(nn.Module):
    """Per-channel standardization whose constants are plain attributes, so the state dict has none."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean_values = torch.tensor(mean).reshape(1, len(mean), 1, 1)
        self.std_values = torch.tensor(std).reshape(1, len(std), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_values) / self.std_values


class PaperBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the (possibly projected) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class PaperCifarResNet(nn.Module):
    """CIFAR ResNet-depth: 16-channel stem, three stages of (depth-2)/6 blocks at 16/32/64 channels, 8x8 pool."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        c_in = 16
        for name, width, first_stride in (("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                stride = first_stride if i == 0 else 1
                downsample = None
                if stride != 1 or c_in != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(c_in, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
                    )
                blocks.append(PaperBlock(c_in, width, stride, downsample))
                c_in = width
            setattr(self, name, nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)  # (B, 64, 1, 1) for 32x32 inputs
        return self.fc(x.view(x.size(0), -1))


def randomize(model: nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and affine parameters: an import that drops them changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.num_batches_tracked.fill_(7)
            with torch.no_grad():
                m.weight.copy_(0.4 + 0.6 * torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))


def paper_cifar_model(depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(PaperNormalize(CIFAR10_MEAN, CIFAR10_STD), PaperCifarResNet(depth))
    randomize(model, seed)
    return model.eval()


def paper_imagenet_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # DataParallel without GPUs just calls the module, but prefixes its keys with "module." as in the paper
    model = nn.Sequential(PaperNormalize(IMAGENET_MEAN, IMAGENET_STD), nn.DataParallel(torchvision.models.resnet50()))
    randomize(model, seed)
    return model.eval()


def optimizer_state(model: nn.Module) -> dict[str, Any]:
    """An SGD state with momentum buffers, as saved beside the weights by the paper's training script."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer.state_dict()


def save_paper_file(path: Path, content: Any, legacy_format: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path, _use_new_zipfile_serialization=not legacy_format)
    return path


def paper_file_content(model: nn.Sequential, arch: str, **extra: Any) -> dict[str, Any]:
    return {"arch": arch, "state_dict": model.state_dict(), "epoch": 90, "optimizer": optimizer_state(model)} | extra


def assert_same_logits(imported: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = reference(x)
        actual = imported(x)
    assert expected.std() > 0.1  # logits that differ between classes, so a wiring error could not hide
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Sequential, Path]:
    model = paper_cifar_model(20, seed=0)
    src = tmp_path_factory.mktemp("paper") / "models/cifar10/resnet20/noise_0.25/checkpoint.pth.tar"
    save_paper_file(src, paper_file_content(model, "cifar_resnet20"))
    return model, src


def test_paper_keys_are_as_described(resnet20: tuple[nn.Sequential, Path]) -> None:
    model, _ = resnet20
    keys = set(model.state_dict())
    assert {
        "1.conv1.weight",
        "1.bn1.running_var",
        "1.layer1.0.conv1.weight",
        "1.layer2.0.downsample.0.weight",
        "1.layer2.0.downsample.1.running_mean",
        "1.fc.weight",
    } <= keys
    assert not [k for k in keys if k.startswith("0.")]


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip-format", "legacy-format"])
def test_cifar_resnet20_import_gives_identical_logits(tmp_path: Path, legacy_format: bool) -> None:
    reference = paper_cifar_model(20, seed=1)
    src = save_paper_file(
        tmp_path / "models/cifar10/resnet20/noise_0.50/checkpoint.pth.tar",
        paper_file_content(reference, "cifar_resnet20"),
        legacy_format=legacy_format,  # the published files predate PyTorch 1.6's zip format
    )
    registry = tmp_path / "registry"
    manifest = import_paper_checkpoint(src, registry, sigma=0.5)
    imported, loaded_manifest = load_model(registry, manifest.id)
    assert loaded_manifest == manifest
    assert_same_logits(imported, reference, torch.rand(16, 3, 32, 32))


def test_import_depends_on_batchnorm_statistics(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    # guards the test above: with default statistics the same weights give other logits
    reference, src = resnet20
    manifest = import_paper_checkpoint(src, tmp_path, sigma=0.25)
    imported, _ = load_model(tmp_path, manifest.id)
    for m in imported.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (imported(x) - reference(x)).abs().max() > 1e-2


def test_manifest_records_source_and_dataset(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    _, src = resnet20
    manifest = import_paper_checkpoint(src, tmp_path, sigma=0.25)
    assert manifest.id == "cohen2019-cifar10-resnet20-sigma0.25"
    assert [m.id for m in list_models(tmp_path)] == [manifest.id]
    assert manifest.architecture == "cifar_resnet20"
    assert manifest.dataset == "cifar10"
    assert manifest.classes == CIFAR10_CLASSES
    assert manifest.classes[0] == "airplane" and len(manifest.classes) == 10
    assert manifest.input_shape == (3, 32, 32)
    assert manifest.sigma == 0.25
    assert manifest.normalization.mean == list(CIFAR10_MEAN)
    assert manifest.normalization.std == list(CIFAR10_STD)
    assert manifest.source["file"] == str(src.resolve())
    assert manifest.source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest.source["arch"] == "cifar_resnet20"
    assert manifest.source["epoch"] == 90
    assert manifest.source["paper"] == PAPER == "Cohen, Rosenfeld & Kolter 2019"


def test_custom_id(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    _, src = resnet20
    manifest = import_paper_checkpoint(src, tmp_path, sigma=0.25, model_id="my-model")
    assert manifest.id == "my-model"
    assert (tmp_path / "my-model" / MANIFEST_FILE).is_file()


def test_file_without_epoch_or_optimizer_and_old_batchnorm(tmp_path: Path) -> None:
    # PyTorch < 0.4.1 saved no num_batches_tracked counters; they do not affect eval-mode outputs
    reference = paper_cifar_model(20, seed=2)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    src = save_paper_file(tmp_path / "old.pth.tar", {"arch": "cifar_resnet20", "state_dict": state})
    manifest = import_paper_checkpoint(src, tmp_path / "registry", sigma=1.0)
    assert "epoch" not in manifest.source
    imported, _ = load_model(tmp_path / "registry", manifest.id)
    assert_same_logits(imported, reference, torch.rand(4, 3, 32, 32))


def test_cifar_resnet110_import_gives_identical_logits(tmp_path: Path) -> None:
    reference = paper_cifar_model(110, seed=3)
    src = save_paper_file(
        tmp_path / "models/cifar10/resnet110/noise_1.00/checkpoint.pth.tar",
        paper_file_content(reference, "cifar_resnet110"),
    )
    manifest = import_paper_checkpoint(src, tmp_path / "registry", sigma=1.0)
    assert manifest.id == "cohen2019-cifar10-resnet110-sigma1"
    imported, _ = load_model(tmp_path / "registry", manifest.id)
    assert_same_logits(imported, reference, torch.rand(8, 3, 32, 32))


def test_convert_state_dict_strips_data_parallel_prefix() -> None:
    # the fast check of the ImageNet key mapping; the slow test below runs a whole ResNet-50
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    wrapped = nn.Sequential(nn.Identity(), nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))))
    paper_state = wrapped.state_dict()
    assert "1.module.1.running_var" in paper_state
    converted = convert_state_dict(paper_state, model)
    assert sorted(converted) == sorted(model.state_dict())
    assert converted["1.0.weight"] is paper_state["1.module.0.weight"]


@pytest.mark.slow
def test_imagenet_resnet50_import_strips_data_parallel_prefix(tmp_path: Path) -> None:
    reference = paper_imagenet_model(seed=4)
    content = paper_file_content(reference, "resnet50")
    assert "1.module.layer4.2.bn3.running_var" in content["state_dict"]
    src = save_paper_file(tmp_path / "models/imagenet/resnet50/noise_0.50/checkpoint.pth.tar", content)
    manifest = import_paper_checkpoint(src, tmp_path / "registry", sigma=0.5)
    assert manifest.id == "cohen2019-imagenet-resnet50-sigma0.5"
    assert manifest.dataset == "imagenet"
    assert manifest.input_shape == (3, 224, 224)
    assert len(manifest.classes) == 1000 and manifest.classes[0] == "tench"
    assert manifest.normalization.mean == list(IMAGENET_MEAN)
    imported, _ = load_model(tmp_path / "registry", manifest.id)
    assert_same_logits(imported, reference, torch.rand(2, 3, 224, 224))


@pytest.mark.parametrize(
    ("path", "sigma"),
    [
        ("models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar", 0.25),
        ("/data/models/imagenet/resnet50/noise_1.00/checkpoint.pth.tar", 1.0),
        ("noise_0.12/checkpoint.pth.tar", 0.12),
        ("runs/noise_0.50/models/cifar10/resnet20/noise_0.25/checkpoint.pth.tar", 0.25),
        ("noise_0.50", 0.5),
        ("models/cifar10/resnet110/checkpoint.pth.tar", None),
        ("models/noise_abc/checkpoint.pth.tar", None),
        ("models/my_noise_0.25/checkpoint.pth.tar", None),
    ],
)
def test_infer_sigma(path: str, sigma: float | None) -> None:
    assert infer_sigma(Path(path)) == sigma


def test_default_model_id() -> None:
    assert default_model_id("cifar_resnet110", 0.12) == "cohen2019-cifar10-resnet110-sigma0.12"
    assert default_model_id("resnet50", 0.25) == "cohen2019-imagenet-resnet50-sigma0.25"


def test_cli_infers_sigma_from_path(
    resnet20: tuple[nn.Sequential, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, src = resnet20
    main([str(src), "--registry", str(tmp_path)])
    (manifest,) = list_models(tmp_path)
    assert manifest.sigma == 0.25
    assert manifest.id in capsys.readouterr().out


def test_cli_explicit_sigma_and_id(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    _, src = resnet20
    main([str(src), "--sigma", "0.5", "--id", "paper-r20", "--registry", str(tmp_path)])
    (manifest,) = list_models(tmp_path)
    assert (manifest.id, manifest.sigma) == ("paper-r20", 0.5)


def test_cli_needs_sigma_without_noise_folder(
    resnet20: tuple[nn.Sequential, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, src = resnet20
    plain = tmp_path / "checkpoint.pth.tar"
    plain.write_bytes(src.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main([str(plain), "--registry", str(tmp_path / "registry")])
    assert exit_info.value.code == 2
    assert "--sigma is required" in capsys.readouterr().err
    assert not (tmp_path / "registry").exists()


def test_cli_reports_a_bad_file(tmp_path: Path) -> None:
    src = tmp_path / "noise_0.25" / "checkpoint.pth.tar"
    src.parent.mkdir()
    src.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), "--registry", str(tmp_path / "registry")])
    assert str(src) in str(exit_info.value.code)


def test_existing_destination_needs_overwrite(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    _, src = resnet20
    import_paper_checkpoint(src, tmp_path, sigma=0.25)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        import_paper_checkpoint(src, tmp_path, sigma=0.25)
    manifest = import_paper_checkpoint(src, tmp_path, sigma=0.25, overwrite=True)
    assert [m.id for m in list_models(tmp_path)] == [manifest.id]


@pytest.mark.parametrize("sigma", [0.0, -0.25, float("nan"), float("inf")])
def test_sigma_must_be_positive(resnet20: tuple[nn.Sequential, Path], tmp_path: Path, sigma: float) -> None:
    _, src = resnet20
    with pytest.raises(ValueError, match="σ must be > 0 and finite"):
        import_paper_checkpoint(src, tmp_path, sigma=sigma)
    assert list(tmp_path.iterdir()) == []


def test_invalid_model_id(resnet20: tuple[nn.Sequential, Path], tmp_path: Path) -> None:
    _, src = resnet20
    with pytest.raises(ValueError, match="invalid model id"):
        import_paper_checkpoint(src, tmp_path / "registry", sigma=0.25, model_id="../escape")
    assert not (tmp_path / "escape").exists()


def renamed_key_file() -> dict[str, Any]:
    state = dict(paper_cifar_model(20, seed=5).state_dict())
    state["1.classifier.weight"] = state.pop("1.fc.weight")
    return {"arch": "cifar_resnet20", "state_dict": state}


def deeper_arch_file() -> dict[str, Any]:
    """ResNet-20 weights labelled as ResNet-110."""
    return {"arch": "cifar_resnet110", "state_dict": paper_cifar_model(20, seed=5).state_dict()}


def wider_fc_file() -> dict[str, Any]:
    """A CIFAR-100 model."""
    model = nn.Sequential(PaperNormalize(CIFAR10_MEAN, CIFAR10_STD), PaperCifarResNet(20, num_classes=100))
    return {"arch": "cifar_resnet20", "state_dict": model.state_dict()}


MISMATCHED_FILES = {"renamed": renamed_key_file, "deeper": deeper_arch_file, "wider": wider_fc_file}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(3), "expected a dict, found Tensor"),
        ({"state_dict": {}}, "no 'arch' entry"),
        ({"arch": "cifar_resnet20", "epoch": 90}, "no 'state_dict' entry"),
        ({"arch": "vgg16", "state_dict": {}}, "unknown architecture 'vgg16'"),
        ({"arch": ["cifar_resnet20"], "state_dict": {}}, "unknown architecture"),
        ({"arch": "cifar_resnet20", "state_dict": [1, 2]}, "'state_dict' is a list, not a dict"),
        ({"arch": "cifar_resnet20", "state_dict": {}}, "missing keys: 1.bn1.bias"),
        ("renamed", "missing keys: 1.fc.weight; unexpected keys: 1.classifier.weight"),
        ("deeper", r"missing keys: 1\.layer1\.1\d\.bn1\.bias, .*\(450 in all\)"),
        ("wider", r"wrong shapes: 1\.fc\.weight \(file \(100, 64\), model \(10, 64\)\), 1\.fc\.bias"),
    ],
    ids=[
        "tensor",
        "no-arch",
        "no-state-dict",
        "unknown-arch",
        "arch-not-str",
        "state-not-dict",
        "empty-state",
        "renamed-key",
        "depth-mismatch",
        "shape-mismatch",
    ],
)
def test_malformed_files_raise_checkpoint_error(tmp_path: Path, content: Any, message: str) -> None:
    if isinstance(content, str):
        content = MISMATCHED_FILES[content]()
    src = save_paper_file(tmp_path / "noise_0.25" / "checkpoint.pth.tar", content)
    with pytest.raises(CheckpointError, match=message) as error:
        import_paper_checkpoint(src, tmp_path / "registry", sigma=0.25)
    assert error.type is CheckpointError
    assert str(src) in str(error.value)
    assert not (tmp_path / "registry").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found") as error:
        import_paper_checkpoint(tmp_path / "absent.pth.tar", tmp_path, sigma=0.25)
    assert str(tmp_path / "absent.pth.tar") in str(error.value)
