"""Inputs of the benchmark: test images for the library, fresh random images for the HTTP loads.

Every HTTP request of a load gets a new random image (and seed), so the certificate cache never
answers one: the numbers measure sampling, not the cache. Images are 8-bit, so the tensor the
service decodes from the PNG is exactly ``pixels / 255``, the tensor the in-process loops use.
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import torch
from PIL import Image

from models.checkpoint import Manifest

log = logging.getLogger(__name__)


def random_pixels(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Uniform 8-bit pixels, uint8 (C, H, W)."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (C, H, W) → float32 (C, H, W) in [0, 1], as the service decodes it."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def png_base64(pixels: np.ndarray) -> str:
    """uint8 (C, H, W) with C = 1 or 3 as a base64 PNG, for a JSON body's ``image_base64``."""
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_set_images(manifest: Manifest, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``count`` images (count, C, H, W) in [0, 1] from the model's test set, and where they came from.

    Falls back to random 8-bit images when the test set is not on this machine (only
    Fashion-MNIST has a default location); throughput does not depend on the pixels, only the
    reported radii do.
    """
    from training.data import load_dataset  # training pulls in torchvision datasets; only needed here

    generator = torch.Generator().manual_seed(seed)
    try:
        dataset = load_dataset(manifest.dataset, "test")
    except Exception as e:  # DatasetNotFound, or a dataset that needs a --data-root
        log.info("test set of %s unavailable (%s); using random images", manifest.dataset, e)
        rng = np.random.default_rng(seed)
        return torch.stack([pixels_to_tensor(random_pixels(rng, manifest.input_shape)) for _ in range(count)]), "random"
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    images = torch.stack([dataset[i][0] for i in indices])
    return images, f"{manifest.dataset} test set"
