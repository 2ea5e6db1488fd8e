"""Import the base classifiers published with Cohen, Rosenfeld & Kolter (2019) into a model registry.

Their files (github.com/locuslab/smoothing, e.g. ``models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar``)
are torch pickles of ``{'arch', 'state_dict', 'epoch', 'optimizer'}``. The model they saved was
``Sequential(NormalizeLayer, net)``; the normalization layer holds no tensors, so every key starts
with ``1.``: ``1.conv1.weight``, ``1.layer2.0.downsample.1.running_mean``, ``1.fc.bias`` for the CIFAR
ResNets (the attribute names of our SmallResNet), and ``1.module.<torchvision key>`` for the ImageNet
ResNet-50, which was wrapped in DataParallel. σ is not stored in the file: it is in the folder name.

    import-paper-checkpoint models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar   # σ from the path
    import-paper-checkpoint downloaded.pth.tar --sigma 0.5 --id my-imagenet-model
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from models.architectures import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, build_model
from models.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    Manifest,
    load_weights,
    read_state_dict,
    save_checkpoint,
    sha256_of,
)
from models.registry import DEFAULT_ROOT, check_model_id

PAPER = "Cohen, Rosenfeld & Kolter 2019"
PAPER_URL = "https://github.com/locuslab/smoothing"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# torchvision ships the 1000 ImageNet class names in the package (no download), in the sorted-wnid
# order of an ImageFolder, which is the label order the paper's ResNet-50 was trained with.
IMAGENET_CLASSES = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class PaperDataset:
    """What the manifest needs to know about the data a paper model was trained on."""

    name: str
    classes: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W) in [0, 1] pixel space
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = PaperDataset("cifar10", CIFAR10_CLASSES, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD)
IMAGENET = PaperDataset("imagenet", IMAGENET_CLASSES, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)
PAPER_ARCHS = {"cifar_resnet20": CIFAR10, "cifar_resnet110": CIFAR10, "resnet50": IMAGENET}

NOISE_DIR = re.compile(r"noise_(\d+(?:\.\d*)?)")


def infer_sigma(path: Path) -> float | None:
    """σ from the last ``noise_<σ>`` component of ``path`` (the paper's folder layout), or None."""
    for part in reversed(Path(path).parts):
        match = NOISE_DIR.fullmatch(part)
        if match:
            return float(match.group(1))
    return None


def default_model_id(arch: str, sigma: float) -> str:
    """``cohen2019-<dataset>-<arch>-sigma<σ>``, e.g. ``cohen2019-cifar10-resnet110-sigma0.25``."""
    return f"cohen2019-{PAPER_ARCHS[arch].name}-{arch.removeprefix('cifar_')}-sigma{sigma:g}"


def convert_state_dict(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The paper's keys renamed to ours: ``1.module.x`` (DataParallel) becomes ``1.x``.

    BatchNorm ``num_batches_tracked`` counters missing from files written by old PyTorch versions
    are filled with 0: they only matter for training with momentum=None, never in eval mode.
    """
    converted = {(f"1.{k.removeprefix('1.module.')}" if k.startswith("1.module.") else k): v for k, v in state.items()}
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    return converted


def read_paper_checkpoint(src: Path) -> tuple[str, dict[str, Any], int | None]:
    """``(arch, state_dict, epoch)`` of a paper checkpoint file, loaded safely; CheckpointError if malformed."""
    obj = read_state_dict(src)
    for field in ("arch", "state_dict"):
        if field not in obj:
            raise CheckpointError(f"{src}: no {field!r} entry; found {sorted(map(str, obj))} (not a paper checkpoint?)")
    arch, state, epoch = obj["arch"], obj["state_dict"], obj.get("epoch")
    if not isinstance(arch, str) or arch not in PAPER_ARCHS:
        raise CheckpointError(f"{src}: unknown architecture {arch!r}; importable: {sorted(PAPER_ARCHS)}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{src}: 'state_dict' is a {type(state).__name__}, not a dict")
    return arch, state, epoch if isinstance(epoch, int) else None


def import_paper_checkpoint(
    src: Path, dest_root: Path, *, sigma: float, model_id: str | None = None, overwrite: bool = False
) -> Manifest:
    """Convert the paper checkpoint ``src`` into the registry checkpoint ``dest_root/<model_id>``.

    ``sigma`` is the noise level the model was trained with (in units of pixel values in [0, 1]); ``model_id``
    defaults to ``default_model_id(arch, sigma)``. The weights are loaded with weights_only=True
    (no code from the file runs) and strictly: every key and shape must match the architecture.
    The manifest's ``source`` records the file, its sha256, the arch, the epoch and the paper.
    Raises CheckpointError naming ``src`` for a malformed file, ValueError for a bad σ or id, and
    FileExistsError if the destination holds a checkpoint and ``overwrite`` is False.
    """
    src = Path(src)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"σ must be > 0 and finite, got {sigma} (the registry serves smoothed classifiers only)")
    arch, state, epoch = read_paper_checkpoint(src)
    dataset = PAPER_ARCHS[arch]
    model_id = check_model_id(model_id or default_model_id(arch, sigma))
    dest = Path(dest_root) / model_id
    if (dest / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{dest} already holds a checkpoint; choose another id or overwrite it")
    model = build_model(arch, len(dataset.classes), dataset.mean, dataset.std)
    load_weights(model, convert_state_dict(state, model), src)
    source = {"paper": PAPER, "url": PAPER_URL, "file": str(src.resolve()), "sha256": sha256_of(src), "arch": arch}
    if epoch is not None:
        source["epoch"] = epoch
    return save_checkpoint(
        model.eval(),
        dest,
        id=model_id,
        architecture=arch,
        dataset=dataset.name,
        classes=dataset.classes,
        input_shape=dataset.input_shape,
        sigma=sigma,
        normalization={"mean": list(dataset.mean), "std": list(dataset.std)},
        source=source,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the paper's checkpoint file (checkpoint.pth.tar)")
    parser.add_argument("--sigma", type=float, help="σ the model was trained with (default: from a noise_<σ> folder)")
    parser.add_argument("--id", help="model id in the registry (default: cohen2019-<dataset>-<arch>-sigma<σ>)")
    parser.add_argument("--registry", type=Path, default=DEFAULT_ROOT, help=f"registry folder (default {DEFAULT_ROOT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint with this id")
    args = parser.parse_args(argv)
    sigma = args.sigma if args.sigma is not None else infer_sigma(args.src)
    if sigma is None:
        parser.error(f"--sigma is required: no noise_<σ> folder in {args.src}")
    try:
        manifest = import_paper_checkpoint(
            args.src, args.registry, sigma=sigma, model_id=args.id, overwrite=args.overwrite
        )
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"import-paper-checkpoint: error: {e}")
    print(
        f"imported {args.src} as {manifest.id} (σ={manifest.sigma:g}, {manifest.architecture}, "
        f"{manifest.dataset}) into {args.registry / manifest.id}"
    )


if __name__ == "__main__":
    main()
