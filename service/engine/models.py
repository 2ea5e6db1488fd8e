"""Models as the engine holds them: a checkpoint's manifest with its tuned inference plan on a device."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from models.checkpoint import Manifest, manifest_digest
from models.registry import list_models, load_model
from smoothing.tuning import InferencePlan, prepare_for_inference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    plan: InferencePlan
    device: torch.device

    @cached_property  # frozen dataclass: cached_property writes the instance __dict__ directly
    def manifest_digest(self) -> str:
        """Digest of the manifest's content (models.checkpoint.manifest_digest): names the classifier in keys."""
        return manifest_digest(self.manifest)

    @property
    def precision(self) -> str:
        """The arithmetic the base classifier actually runs in (float32, or the autocast dtype)."""
        return self.plan.precision

    @property
    def batch_size(self) -> int:
        """The plan's throughput batch size (each executor may refine its own: ``Executor.batch_size``)."""
        return self.plan.batch_size

    def batch_size_for(self, interactive: bool) -> int:
        """The interactive batch while predictions are recent (shorter waits), else the fastest."""
        return self.plan.interactive_batch_size if interactive else self.plan.batch_size


def pick_device(name: str) -> torch.device:
    """'auto' → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_models(
    model_dir: Path,
    model_ids: list[str],
    device: torch.device,
    *,
    max_batch: int = 0,
    tuning_cache: Path | None = None,
    precision: str = "float32",
) -> dict[str, LoadedModel]:
    """Load and tune the requested models (all in ``model_dir`` when ``model_ids`` is empty)."""
    ids = model_ids or [m.id for m in list_models(model_dir)]
    loaded = {}
    for model_id in ids:
        model, manifest = load_model(model_dir, model_id, device)
        plan = prepare_for_inference(
            model, manifest.input_shape, device, cache_key=manifest.sha256, cache_file=tuning_cache, precision=precision
        )
        if max_batch:
            plan = replace(
                plan,
                batch_size=min(plan.batch_size, max_batch),
                interactive_batch_size=min(plan.interactive_batch_size, max_batch),
            )
        log.info(
            "loaded %s on %s: batch %d (interactive %d), %.0f samples/s",
            model_id,
            device,
            plan.batch_size,
            plan.interactive_batch_size,
            plan.samples_per_second,
        )
        loaded[model_id] = LoadedModel(manifest, plan, device)
    return loaded
