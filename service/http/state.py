"""The running service's parts, built by the app's lifespan and reached by the routes through the request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from service.cache import Cache
    from service.engine.engine import Engine
    from service.engine.models import LoadedModel
    from service.engine.pool import Pool
    from service.engine.scheduler import Scheduler
    from service.jobs.runner import JobRunner
    from service.jobs.uploads import DecodeBudget
    from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    scheduler: Scheduler
    pool: Pool
    engine: Engine
    cache: Cache
    jobs: JobRunner
    uploads: DecodeBudget  # bytes of job uploads being decompressed, shared by concurrent uploads
    default_model: str = ""  # the model answering requests that name none (``pick_default_model``)
    signing_key: Ed25519PrivateKey | None = None


def pick_default_model(settings: Settings, loaded: dict[str, LoadedModel]) -> str:
    """CERTSERVE_DEFAULT_MODEL if set (RuntimeError if it is not loaded), else the first of CERTSERVE_MODELS,
    else the first plain classifier loaded, else the first loaded."""
    if settings.default_model is not None:
        if settings.default_model not in loaded:
            raise RuntimeError(f"CERTSERVE_DEFAULT_MODEL = {settings.default_model!r} is not among the loaded models")
        return settings.default_model
    if settings.models:
        return settings.models[0]
    plain = [m for m, model in loaded.items() if model.manifest.kind == "classifier"]
    return plain[0] if plain else next(iter(loaded))


def services(request: Request) -> Services:
    """The ``Services`` of the app serving ``request`` (set once its lifespan has started)."""
    return request.app.state.services
