"""training/data.py: datasets from local files only, as tensors in [0, 1]."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from idx_files import idx_bytes, write_idx
from PIL import Image

from training.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    DatasetNotFound,
    cifar10,
    class_names,
    fashion_mnist,
    imagenet,
    load_dataset,
    read_idx,
)


def write_fashion_mnist(root: Path, split_sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny Fashion-MNIST IDX files under ``root``; returns {split: (images, labels)} as written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, size in split_sizes.items():
        prefix = {"train": "train", "test": "t10k"}[split]
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = (np.arange(size) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_roundtrip(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    read = read_idx(tmp_path / name)
    assert read.shape == (2, 3, 4)
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_other_types(tmp_path: Path) -> None:
    path = tmp_path / "floats-idx1"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\0\0\0\0")  # 0x0D: float32 IDX
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_truncated_body(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, dtype=np.uint8))[:-3]))
    with pytest.raises(ValueError, match="expected 10 values"):
        read_idx(path)


def test_fashion_mnist_from_folder(tmp_path: Path) -> None:
    written = write_fashion_mnist(tmp_path, {"train": 5, "test": 3})
    for split, (images, labels) in written.items():
        dataset = fashion_mnist(split, tmp_path)
        assert len(dataset) == len(labels)
        x, y = dataset[1]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        torch.testing.assert_close(x[0], torch.from_numpy(images[1]).float() / 255)
        assert y.dtype == torch.int64 and int(y) == labels[1]
    assert len(load_dataset("fashion-mnist", "test", tmp_path)) == 3


def test_fashion_mnist_missing_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="dataset-fashion-mnist") as info:
        fashion_mnist("test", tmp_path)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def write_cifar10(root: Path, per_batch: int) -> np.ndarray:
    """A fake ``cifar-10-batches-py`` folder in torchvision's pickle layout; returns the test batch's rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rows = None
    for name in names:
        rows = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)  # R plane, G plane, B plane
        entry = {"batch_label": name, "data": rows, "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES}))
    return rows


def test_cifar10_from_folder_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_rows = write_cifar10(tmp_path, per_batch=4)
    # Fake files cannot match the published md5 sums torchvision checks; real files do.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchvision tried to download CIFAR-10")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_download)
    train, test = cifar10("train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert len(train) == 20 and len(test) == 4
    x, y = test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    torch.testing.assert_close(x, torch.from_numpy(test_rows[2].reshape(3, 32, 32)).float() / 255)
    assert y == 2
    assert class_names("cifar10", test) == CIFAR10_CLASSES


def write_image_folder(root: Path, classes: list[str], per_class: int) -> None:
    rng = np.random.default_rng(2)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)  # not square, not 224
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagenet_image_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "val", ["n01", "n02"], per_class=2)
    dataset = load_dataset("imagenet", "val", tmp_path)
    assert len(dataset) == 4
    assert class_names("imagenet", dataset) == ["n01", "n02"]
    x, y = dataset[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y == 1


def test_imagenet_train_split_is_cropped_to_224(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", ["n01"], per_class=1)
    x, y = imagenet("train", tmp_path)[0]
    assert x.shape == (3, 224, 224) and y == 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cifar10", "cifar-10-batches-py"), ("imagenet", "ImageFolder")],
)
def test_missing_folder_says_what_is_expected(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFound, match=expected) as info:
        load_dataset(name, "test", tmp_path)
    assert str(tmp_path) in str(info.value)


def test_datasets_without_default_need_a_root() -> None:
    for name in ("cifar10", "imagenet"):
        with pytest.raises(DatasetNotFound, match="--data-root"):
            load_dataset(name, "test", None)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "test", tmp_path)


def test_fashion_mnist_class_names(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, {"test": 2})
    assert class_names("fashion-mnist", fashion_mnist("test", tmp_path)) == FASHION_MNIST_CLASSES
