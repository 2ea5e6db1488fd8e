"""Datasets as tensors in [0, 1] pixel space, from local files only (never a download).

- Fashion-MNIST: the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), read directly because their checksums differ from
  those torchvision expects.
- CIFAR-10: torchvision's ``CIFAR10`` folder layout (``cifar-10-batches-py``) under a root.
- ImageNet: an ``ImageFolder`` tree (``<root>/<split>/<class>/*.JPEG``), resized to 256 and
  center-cropped to 224 for evaluation.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DATASETS = ("fashion-mnist", "cifar10", "imagenet")


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are not where the user pointed; the message says how to get them."""


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size}")
    return body.reshape(shape)


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> TensorDataset:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000): images (N, 1, 28, 28) float in [0, 1], labels int64."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DatasetNotFound(
            f"Fashion-MNIST not found in {root}; install it with `sudo apt-get install dataset-fashion-mnist`"
        )
    images = torch.from_numpy(read_idx(images_path).copy()).unsqueeze(1).float().div_(255)
    labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
    return TensorDataset(images, labels)


def cifar10(split: str, root: Path) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's layout), images (3, 32, 32) in [0, 1]."""
    if not (Path(root) / "cifar-10-batches-py").is_dir():
        raise DatasetNotFound(f"CIFAR-10 not found: expected {root}/cifar-10-batches-py (torchvision's CIFAR10 layout)")
    try:
        return torchvision.datasets.CIFAR10(
            str(root), train=split == "train", download=False, transform=transforms.ToTensor()
        )
    except RuntimeError as e:  # torchvision checks every file's md5 even without downloading
        raise DatasetNotFound(f"CIFAR-10 under {root} is incomplete or corrupted ({e})") from None


def imagenet(split: str, root: Path) -> Dataset:
    """ImageNet from an ImageFolder tree ``root/<split>``; images (3, 224, 224) in [0, 1]."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetNotFound(f"ImageNet not found: expected an ImageFolder tree at {folder}")
    if split == "train":
        transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return torchvision.datasets.ImageFolder(str(folder), transform=transform)


def load_dataset(name: str, split: str, root: Path | None = None) -> Dataset:
    """A dataset by name: ``fashion-mnist`` (root defaults to Debian's folder), ``cifar10`` or ``imagenet``."""
    if name == "fashion-mnist":
        return fashion_mnist(split, root or FASHION_MNIST_DIR)
    if root is None:
        raise DatasetNotFound(f"{name} needs --data-root pointing at a local copy (nothing is downloaded)")
    if name == "cifar10":
        return cifar10(split, root)
    if name == "imagenet":
        return imagenet(split, root)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def class_names(name: str, dataset: Dataset) -> list[str]:
    if name == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes else list(CIFAR10_CLASSES)
