"""The model registry: a folder of checkpoint folders, one per model, named after the model's id.

    checkpoints/
        fmnist-resnet-sigma0.25/   manifest.json (id "fmnist-resnet-sigma0.25") + weights.pt
        cohen2019-cifar10-resnet110-sigma0.25/ ...

Listing reads only the manifests; loading (``load_model``) also checks the weights' sha256.
A composed model (``models.composed``) is a folder with a manifest only, naming other folders
of the same registry as its parts; ``load_model`` loads and checks them and returns one module.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import MANIFEST_FILE, CheckpointError, Manifest, load_checkpoint, read_manifest
from models.composed import load_composed

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"

# Ids are folder names: no separators, no leading dot (so never "." or ".." and never hidden).
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

log = logging.getLogger(__name__)


class ModelNotFound(KeyError):
    """No model with this id in the registry; the message lists the ids that are there."""

    def __init__(self, model_id: str, root: Path, available: list[str]) -> None:
        super().__init__(model_id)
        self.model_id = model_id
        self.root = root
        self.available = available

    def __str__(self) -> str:
        known = ", ".join(self.available) if self.available else "none"
        return f"no model {self.model_id!r} in registry {self.root}; available: {known}"


def check_model_id(model_id: str) -> str:
    """Return ``model_id`` if it can be a registry folder name, else raise ValueError."""
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise ValueError(
            f"invalid model id {model_id!r}: use letters, digits and . _ + - (not first), no path separators"
        )
    return model_id


def read_registry_manifest(directory: Path) -> Manifest:
    """The manifest of one registry folder; CheckpointError if invalid or if its id is not the folder name."""
    manifest = read_manifest(directory)
    if manifest.id != directory.name:
        raise CheckpointError(
            f"{directory / MANIFEST_FILE}: manifest id {manifest.id!r} differs from its folder name "
            f"{directory.name!r}; rename the folder or fix the id"
        )
    return manifest


def list_models(root: Path, parts: bool = False) -> list[Manifest]:
    """Manifests of every valid checkpoint folder under ``root``, sorted by id.

    Only models that can be smoothed on their own (``Manifest.servable``: classifiers trained
    with noise, composed models) unless ``parts``: then denoisers and classifiers trained without
    noise (σ = 0), which exist to be parts of composed models, too.

    A broken folder (no manifest, invalid manifest, id not equal to the folder name) is skipped
    with a logged warning naming it, so that one bad folder never hides the others. Files and
    hidden folders in ``root`` are ignored; a missing ``root`` is an empty registry (warned).
    Weights are not read here: ``load_model`` checks them.
    """
    root = Path(root)
    if not root.is_dir():
        log.warning("model registry %s does not exist; no models", root)
        return []
    manifests = []
    for directory in sorted(root.iterdir()):
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            manifest = read_registry_manifest(directory)
        except CheckpointError as e:
            log.warning("skipping registry folder %s: %s", directory, e)
            continue
        if parts or manifest.servable:
            manifests.append(manifest)
    return sorted(manifests, key=lambda m: m.id)


def find_checkpoint(root: Path, model_id: str) -> Path:
    """The folder of model ``model_id`` in the registry at ``root``.

    Raises ModelNotFound (a KeyError listing the available ids) when there is no such folder or
    the id is not a valid folder name, and CheckpointError when the folder's manifest is broken.
    """
    root = Path(root)
    try:
        check_model_id(model_id)
    except ValueError:
        raise ModelNotFound(model_id, root, [m.id for m in list_models(root, parts=True)]) from None
    directory = root / model_id
    if not directory.is_dir():
        raise ModelNotFound(model_id, root, [m.id for m in list_models(root, parts=True)])
    read_registry_manifest(directory)
    return directory


def load_model(root: Path, model_id: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
    """Load model ``model_id`` from the registry at ``root`` in eval mode on ``device``.

    The weights' sha256 is checked against the manifest; a composed model's parts are loaded
    from the same registry and checked (``models.composed.load_composed``). Raises ModelNotFound
    for an unknown id and CheckpointError (naming the file, and the part) for a broken checkpoint.
    """
    directory = find_checkpoint(root, model_id)
    manifest = read_registry_manifest(directory)
    if manifest.kind == "composed":
        return load_composed(root, manifest, device), manifest
    return load_checkpoint(directory, device)
