"""Shapes, depth rules and the normalization layer of models.architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.architectures import (
    ARCHITECTURES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    NormalizeLayer,
    build_model,
    cifar_resnet,
    fmnist_resnet,
)


@pytest.mark.parametrize(
    ("arch", "num_classes", "input_shape", "mean", "std"),
    [
        ("fmnist_resnet", 10, (1, 28, 28), (0.286,), (0.353,)),
        ("cifar_resnet20", 10, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        ("cifar_resnet110", 7, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        # ResNet-50 pools adaptively, so a small image checks the wiring fast; 224x224 is the slow case
        ("resnet50", 1000, (3, 64, 64), IMAGENET_MEAN, IMAGENET_STD),
        pytest.param("resnet50", 1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, marks=pytest.mark.slow),
    ],
)
def test_output_shape(arch: str, num_classes: int, input_shape: tuple[int, int, int], mean, std) -> None:
    model = build_model(arch, num_classes, mean, std).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, *input_shape))
    assert isinstance(model[0], NormalizeLayer)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


def test_every_architecture_is_covered() -> None:
    assert set(ARCHITECTURES) == {"fmnist_resnet", "fmnist_dncnn", "cifar_resnet20", "cifar_resnet110", "resnet50"}


def test_denoiser_maps_images_to_images_and_starts_as_the_identity() -> None:
    model = build_model("fmnist_dncnn", 10, (0.0,), (1.0,)).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x, atol=0, rtol=0)  # the last convolution starts at zero
        nn.init.normal_(model[1].body[-2].weight, std=0.1)
        out = model(x)
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.parametrize("depth", [0, 2, 7, 9, 21, 111])
def test_cifar_resnet_rejects_depths_not_6k_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match="6k\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (20, 3), (110, 18)])
def test_cifar_resnet_depth_counts_layers(depth: int, blocks: int) -> None:
    net = cifar_resnet(depth)
    assert [len(getattr(net, f"layer{s}")) for s in (1, 2, 3)] == [blocks] * 3
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    # depth counts the stem conv, two 3x3 convs per block and the final linear layer
    assert len(convs) + 1 == depth


def conv_bn_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + 2 * c_out


def test_fmnist_resnet_parameter_count() -> None:
    # stem 1->16, one block per stage 16->16, 16->32 (+1x1 shortcut), 32->64 (+1x1 shortcut), fc 64->10
    expected = (
        conv_bn_params(1, 16, 3)
        + 2 * conv_bn_params(16, 16, 3)
        + conv_bn_params(16, 32, 3)
        + conv_bn_params(32, 32, 3)
        + conv_bn_params(16, 32, 1)
        + conv_bn_params(32, 64, 3)
        + conv_bn_params(64, 64, 3)
        + conv_bn_params(32, 64, 1)
        + 64 * 10
        + 10
    )
    model = fmnist_resnet()
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 50_000 < expected < 200_000  # small enough to sample 100k noisy copies on a CPU


def test_fmnist_resnet_stem_halves_resolution() -> None:
    net = fmnist_resnet()
    with torch.no_grad():
        stem = net.conv1(torch.rand(1, 1, 28, 28))
    assert stem.shape == (1, 16, 14, 14)


def test_basic_block_shortcut_only_when_shape_changes() -> None:
    assert BasicBlock(16, 16, 1).downsample is None
    assert BasicBlock(16, 32, 2).downsample is not None
    assert BasicBlock(16, 32, 1).downsample is not None


def test_normalize_layer_saves_no_tensors_and_normalizes() -> None:
    layer = NormalizeLayer(CIFAR10_MEAN, CIFAR10_STD)
    assert layer.state_dict() == {}
    model = build_model("cifar_resnet20", 10, CIFAR10_MEAN, CIFAR10_STD)
    assert not [k for k in model.state_dict() if k.startswith("0.")]
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, c] - CIFAR10_MEAN[c]) / CIFAR10_STD[c] for c in range(3)], dim=1)
    torch.testing.assert_close(layer(x), expected)


def test_normalize_layer_moves_with_the_model() -> None:
    layer = NormalizeLayer(IMAGENET_MEAN, IMAGENET_STD).to(torch.float64)
    assert layer.mean.dtype == torch.float64
    assert layer(torch.rand(1, 3, 2, 2, dtype=torch.float64)).dtype == torch.float64


def test_build_model_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        build_model("vgg16", 10, CIFAR10_MEAN, CIFAR10_STD)
