"""Models composed of registry checkpoints: one base classifier to the smoothing code.

A composed checkpoint is a folder holding only ``manifest.json`` with ``kind: "composed"``,
``combine`` and ``parts``: other checkpoints of the same registry, each named by id, with a
role and the sha256 its manifest had when the composed manifest was written.

- ``sequential``: a ``denoiser`` then a ``classifier`` (denoised smoothing, Salman et al.
  2020). Logits = classifier(denoiser(x)).
- ``mean_softmax``: k ≥ 2 ``member`` classifiers (ensembles, Horváth et al. 2022). The output is
  log((1/k)·Σ_i softmax(member_i(x))): log-probabilities, whose argmax (all that smoothing uses)
  is the class of highest mean probability.

The composed manifest's ``sha256`` is ``parts_digest(combine, parts)``, so it (and any digest of
the manifest's content) covers every part. Loading checks that digest, that each part's manifest
still has the recorded sha256, each part's own weights (``load_checkpoint``), and that the parts
fit together (roles, kinds, classes, input shape, σ). Every failure is a CheckpointError naming
the composed manifest and the part.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    Manifest,
    Part,
    load_checkpoint,
    parts_digest,
    read_manifest,
)

ROLES = {"sequential": ["denoiser", "classifier"], "mean_softmax": ["member"]}


class MeanSoftmax(nn.Module):
    """log of the mean of the members' softmax outputs, (B, classes); members take the same input."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([member(x).softmax(dim=1) for member in self.members]).mean(0)
        return probabilities.clamp_min(1e-30).log()


def check_roles(combine: str, parts: Sequence[Part], where: str) -> None:
    """CheckpointError unless ``parts`` have the roles ``combine`` needs (in order)."""
    roles = [part.role for part in parts]
    if combine == "sequential" and roles != ROLES["sequential"]:
        raise CheckpointError(f"{where}: sequential needs parts with roles denoiser, classifier; found {roles}")
    if combine == "mean_softmax" and (len(roles) < 2 or set(roles) != {"member"}):
        raise CheckpointError(f"{where}: mean_softmax needs two or more parts with role member; found {roles}")


def check_part(composed: Manifest, part: Part, manifest: Manifest, where: str) -> None:
    """CheckpointError unless the loaded part's manifest fits ``composed`` in its role."""
    name = f"{where}: part {part.id!r} ({part.role})"
    if manifest.sha256 != part.sha256:
        raise CheckpointError(
            f"{name}: its sha256 {manifest.sha256[:12]}… is not the {part.sha256[:12]}… recorded in the composed "
            "manifest (the part was replaced or retrained; write the composed manifest again)"
        )
    wanted_kind = "denoiser" if part.role == "denoiser" else "classifier"
    if manifest.kind != wanted_kind:
        raise CheckpointError(f"{name}: is a {manifest.kind}, not a {wanted_kind}")
    if tuple(manifest.input_shape) != tuple(composed.input_shape):
        raise CheckpointError(f"{name}: input shape {manifest.input_shape} is not {composed.input_shape}")
    if manifest.kind == "classifier" and manifest.classes != composed.classes:
        raise CheckpointError(f"{name}: its classes differ from the composed model's")
    if part.role in ("denoiser", "member") and manifest.sigma != composed.sigma:
        raise CheckpointError(f"{name}: made for σ = {manifest.sigma}, the composed model smooths at {composed.sigma}")


def load_composed(root: Path, manifest: Manifest, device: str | torch.device = "cpu") -> nn.Module:
    """The composed model of ``manifest`` (a folder of the registry at ``root``), in eval mode on ``device``."""
    where = str(Path(root) / manifest.id / MANIFEST_FILE)
    assert manifest.combine is not None
    check_roles(manifest.combine, manifest.parts, where)
    digest = parts_digest(manifest.combine, manifest.parts)
    if digest != manifest.sha256:
        raise CheckpointError(
            f"{where}: sha256 {manifest.sha256[:12]}… is not the digest of its parts {digest[:12]}… (edited by hand?)"
        )
    modules = []
    for part in manifest.parts:
        directory = Path(root) / part.id
        if part.id == manifest.id or not (directory / MANIFEST_FILE).is_file():
            raise CheckpointError(f"{where}: part {part.id!r} ({part.role}) is not a checkpoint in registry {root}")
        try:
            module, part_manifest = load_checkpoint(directory, device)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: part {part.id!r} ({part.role}) cannot be loaded: {e}") from None
        check_part(manifest, part, part_manifest, where)
        modules.append(module)
    model = nn.Sequential(*modules) if manifest.combine == "sequential" else MeanSoftmax(modules)
    return model.to(device).eval()


def save_composed(
    root: Path,
    model_id: str,
    combine: str,
    parts: Sequence[tuple[str, str]],
    *,
    sigma: float | None = None,
    training: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``root/model_id/manifest.json`` composing the registry checkpoints ``parts`` ((id, role) pairs).

    Dataset, classes and input shape come from the classifier parts; σ from the denoiser or the
    members unless given. Each part's current manifest sha256 is recorded. Returns the manifest.
    """
    part_manifests = {part_id: read_manifest(Path(root) / part_id) for part_id, _ in parts}
    pinned = [Part(id=part_id, role=role, sha256=part_manifests[part_id].sha256) for part_id, role in parts]
    check_roles(combine, pinned, f"composed model {model_id!r}")
    classifier = part_manifests[next(p.id for p in pinned if p.role != "denoiser")]
    noise_part = part_manifests[pinned[0].id]  # the denoiser (sequential) or the first member
    architecture = "+".join(part_manifests[p.id].architecture for p in pinned)
    manifest = Manifest(
        id=model_id,
        kind="composed",
        architecture=f"{combine}({architecture})",
        dataset=classifier.dataset,
        classes=classifier.classes,
        input_shape=classifier.input_shape,
        sigma=noise_part.sigma if sigma is None else sigma,
        weights="",
        sha256=parts_digest(combine, pinned),
        parts=pinned,
        combine=combine,
        training=training or {},
        source=source or {"composed_by": "models.composed"},
    )
    for part in pinned:
        check_part(manifest, part, part_manifests[part.id], f"composed model {model_id!r}")
    directory = Path(root) / model_id
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``python -m models.composed --id ID --combine sequential --part denoiser=D --part classifier=C``."""
    from models.registry import DEFAULT_ROOT, check_model_id  # here: the registry imports this module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=DEFAULT_ROOT, help="registry folder (default: %(default)s)")
    parser.add_argument("--id", required=True, help="id (folder name) of the composed model")
    parser.add_argument("--combine", choices=sorted(ROLES), required=True)
    parser.add_argument("--part", action="append", required=True, metavar="ROLE=ID", help="a part, in order")
    args = parser.parse_args(argv)
    parts = []
    for text in args.part:
        role, _, part_id = text.partition("=")
        parts.append((part_id, role))
    command = "python -m models.composed " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        model_id = check_model_id(args.id)
        manifest = save_composed(args.registry, model_id, args.combine, parts, training={"command": command})
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"composed: {e}") from None
    print(f"wrote {args.registry / manifest.id / MANIFEST_FILE} (sha256 {manifest.sha256[:12]}…)")


if __name__ == "__main__":
    main()
