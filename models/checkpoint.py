"""Checkpoints: a folder holding ``weights.pt`` (a state dict) and ``manifest.json`` (its metadata).

The manifest says everything the service needs to use the model (architecture, dataset, class
names, input shape, σ, normalization) and how it was made (training recipe, metrics, source),
with the sha256 of the weights file so that a swapped or damaged file is caught at load time.

Its ``kind`` is ``classifier`` (the default: logits over ``classes``), ``denoiser`` (an image of
the input's shape, trained to undo N(0, σ²I)) or ``composed``: a manifest alone, no weights,
whose ``parts`` name other checkpoints of the same registry by id and sha256 (see
``models.composed``); its ``sha256`` is ``parts_digest`` of those parts, so it changes whenever
any part does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from models.architectures import ARCHITECTURES, build_model

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.pt"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class Normalization(BaseModel):
    mean: list[float]
    std: list[float]


class Part(BaseModel):
    """One part of a composed model: a checkpoint of the same registry, pinned by its manifest's sha256."""

    id: str
    role: Literal["denoiser", "classifier", "member"]
    sha256: str = Field(description="the part's manifest sha256 when the composed manifest was written")


class Manifest(BaseModel):
    """Metadata stored beside the weights (cf. timm's pretrained configs)."""

    id: str
    kind: Literal["classifier", "denoiser", "composed"] = "classifier"
    architecture: str
    dataset: str
    classes: list[str]
    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of inputs in [0, 1] pixel space")
    sigma: float = Field(
        ge=0,
        description="σ of the Gaussian noise the model was trained with (a denoiser: the σ it removes; "
        "0: a classifier trained without noise, only usable as a part of a composed model)",
    )
    normalization: Normalization | None = Field(default=None, description="required unless kind is composed")
    weights: str = WEIGHTS_FILE
    sha256: str = Field(description="sha256 of the weights file; for a composed model, parts_digest of its parts")
    parts: list[Part] = Field(default_factory=list, description="composed only: the parts, in order")
    combine: Literal["sequential", "mean_softmax"] | None = Field(
        default=None, description="composed only: run the parts in sequence, or average the members' softmax"
    )
    training: dict[str, Any] = Field(default_factory=dict, description="recipe, command and metrics")
    source: dict[str, Any] = Field(default_factory=dict, description="where the weights came from")

    @model_validator(mode="after")
    def _check_kind(self) -> Manifest:
        if self.kind != "classifier" and self.sigma == 0:
            raise ValueError(f"sigma must be positive for a {self.kind}")
        if self.kind == "composed":
            if not self.parts or self.combine is None:
                raise ValueError("a composed manifest needs parts and combine")
        elif self.parts or self.combine is not None or self.normalization is None:
            raise ValueError(f"a {self.kind} manifest needs normalization and has no parts or combine")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def servable(self) -> bool:
        """Whether the model can be smoothed on its own: a classifier trained with noise, or a composed model."""
        return self.kind == "composed" or (self.kind == "classifier" and self.sigma > 0)


def parts_digest(combine: str, parts: list[Part]) -> str:
    """sha256 (hex) of the canonical JSON of ``combine`` and every part's id, role and sha256, in order."""
    canonical = json.dumps(
        {"combine": combine, "parts": [part.model_dump() for part in parts]}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON: everything the manifest says, the weights' sha256 included.

    Normalization, classes, architecture and id are outside the weights file, so a certificate
    names the model by this digest rather than by the weights' hash alone.
    """
    canonical = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, directory: Path, **manifest_fields: Any) -> Manifest:
    """Write ``model.state_dict()`` and its manifest into ``directory``; return the manifest.

    ``model`` is the full ``Sequential(NormalizeLayer, net)``; ``manifest_fields`` are every
    Manifest field but ``sha256`` and ``weights``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    manifest = Manifest(sha256=sha256_of(weights), weights=WEIGHTS_FILE, **manifest_fields)
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate ``directory/manifest.json``; CheckpointError if missing or invalid."""
    path = directory / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: manifest not found") from None
    except OSError as e:  # a folder where the file should be, no permission, ...
        raise CheckpointError(f"{path}: manifest not readable: {e.strerror or e}") from None
    except ValidationError as e:
        raise CheckpointError(f"{path}: invalid manifest: {e}") from None


def describe_load_error(error: Exception) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed."""
    text = str(error).strip()
    # The safe unpickler's message is a paragraph of advice; the reason follows this marker.
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0].split(" Please use")[0].strip()
        return f"not loadable with weights_only=True (corrupt, or holds objects other than tensors): {reason}"
    first_line = text.splitlines()[0] if text else ""
    return f"not a readable PyTorch checkpoint (corrupt or truncated?): {type(error).__name__}: {first_line}"


def read_state_dict(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, any failure turned into a CheckpointError.

    weights_only=True never runs code from the file: it only rebuilds tensors and plain containers
    (dict, list, int, float, str, ...), so checkpoints of unknown origin can be opened safely.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # damaged bytes make the decoder raise IndexError, KeyError, struct.error, ...
        raise CheckpointError(f"{path}: {describe_load_error(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def describe_value(value: Any) -> str:
    """A tensor's shape, or the type of anything else, for error messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"


def load_weights(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the missing/unexpected/misshapen keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [
        f"{k} (file {describe_value(state[k])}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the architecture: " + "; ".join(problems))
    model.load_state_dict(state)


def build_from_manifest(manifest: Manifest) -> nn.Sequential:
    """The untrained ``Sequential(NormalizeLayer, net)`` that a manifest describes."""
    if manifest.kind == "composed" or manifest.normalization is None:
        raise CheckpointError(
            f"manifest {manifest.id!r}: a composed model has no weights of its own; load it with "
            "models.registry.load_model, which finds its parts"
        )
    if manifest.architecture not in ARCHITECTURES:
        raise CheckpointError(f"manifest {manifest.id!r}: unknown architecture {manifest.architecture!r}")
    return build_model(
        manifest.architecture, manifest.num_classes, manifest.normalization.mean, manifest.normalization.std
    )


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Sequential, Manifest]:
    """Load the model in ``directory`` in eval mode on ``device``, checking the weights' sha256.

    Raises CheckpointError (naming the file) for a missing, corrupt, truncated, tampered or
    mismatched checkpoint.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest.weights
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    actual = sha256_of(weights)
    if actual != manifest.sha256:
        raise CheckpointError(f"{weights}: sha256 {actual[:12]}… does not match the manifest's {manifest.sha256[:12]}…")
    model = build_from_manifest(manifest)
    load_weights(model, read_state_dict(weights), weights)
    return model.to(device).eval(), manifest
