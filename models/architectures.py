"""Network architectures for base classifiers.

Every model built here takes images in [0, 1] pixel space, shape (B, C, H, W), and
normalizes them inside the network (``NormalizeLayer`` is its first module), so that
Gaussian noise is added in pixel space exactly as in Cohen et al. (2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizeLayer(nn.Module):
    """Per-channel (x - mean) / std. Holds no saved tensors (mean/std are non-persistent buffers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """ResNet with a 3x3 stem and one stage per entry of ``widths``.

    Stage i has ``blocks_per_stage`` basic blocks; every stage after the first halves the
    resolution. With ``stem_stride=1`` and widths 16/32/64 this is the CIFAR ResNet of He et al.
    (2016) used by Cohen et al. (2019); the attribute names (conv1, bn1, layer1..3, fc) match
    their checkpoints.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks_per_stage: int,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for stage, planes in enumerate(widths, start=1):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if stage > 1 and b == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        x = torch.flatten(self.avgpool(x), 1)  # (B, widths[-1])
        return self.fc(x)


def fmnist_resnet(num_classes: int = 10) -> SmallResNet:
    """Residual network for 1x28x28 inputs, sized for fast CPU sampling."""
    return SmallResNet(in_channels=1, num_classes=num_classes, widths=(16, 32, 64), blocks_per_stage=1, stem_stride=2)


def cifar_resnet(depth: int, num_classes: int = 10) -> SmallResNet:
    """CIFAR ResNet-`depth` (depth = 6k + 2): widths 16/32/64, k basic blocks per stage."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6k+2 with k >= 1, got {depth}")
    return SmallResNet(in_channels=3, num_classes=num_classes, widths=(16, 32, 64), blocks_per_stage=(depth - 2) // 6)


def imagenet_resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 (random init; weights come from a checkpoint, never a download)."""
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


class DnCNN(nn.Module):
    """A small DnCNN (Zhang et al. 2017), the denoiser Salman et al. (2020) put in front of a classifier.

    Input and output are images (B, C, H, W) in [0, 1] pixel space, of the same shape; H and W
    must be multiples of ``scale``. The net predicts the noise and the output is the input minus
    it (residual learning). It works at 1/``scale`` resolution without losing information: a
    pixel unshuffle turns each scale x scale block into channels, ``depth`` 3x3 convolutions of
    ``width`` channels follow (the first with ReLU, the middle ones with BatchNorm and ReLU, the
    last back to C·scale² channels), and a pixel shuffle restores the resolution. At scale 2
    this costs about a quarter of a full-resolution DnCNN of the same width.
    """

    def __init__(self, channels: int = 1, width: int = 32, depth: int = 5, scale: int = 2) -> None:
        super().__init__()
        inner = channels * scale * scale
        layers: list[nn.Module] = [nn.PixelUnshuffle(scale), nn.Conv2d(inner, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.Conv2d(width, inner, 3, padding=1), nn.PixelShuffle(scale)]
        self.body = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(self.body[-2].weight)  # the noise estimate starts at 0: the identity map
        nn.init.zeros_(self.body[-2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def fmnist_dncnn(num_classes: int = 0) -> DnCNN:
    """Denoiser for 1x28x28 inputs: 5 convolutions of 32 channels at 14x14 (~2x the classifier's cost).

    ``num_classes`` is not used (a denoiser outputs an image); it is accepted so that every
    architecture builds the same way.
    """
    return DnCNN(channels=1, width=32, depth=5, scale=2)


ARCHITECTURES = {
    "fmnist_resnet": fmnist_resnet,
    "fmnist_dncnn": fmnist_dncnn,
    "cifar_resnet20": lambda num_classes=10: cifar_resnet(20, num_classes),
    "cifar_resnet110": lambda num_classes=10: cifar_resnet(110, num_classes),
    "resnet50": imagenet_resnet50,
}


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``Sequential(NormalizeLayer(mean, std), net)``: the layout of Cohen et al.'s checkpoints."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return nn.Sequential(NormalizeLayer(mean, std), ARCHITECTURES[arch](num_classes=num_classes))
