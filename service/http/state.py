"""The running service's parts, built by the app's lifespan and reached by the routes through the request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from service.cache import Cache
    from service.engine.engine import Engine
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
    signing_key: Ed25519PrivateKey | None = None

    @property
    def default_model(self) -> str:
        """The model answering requests that name none: the first loaded."""
        return next(iter(self.engine.models))


def services(request: Request) -> Services:
    """The ``Services`` of the app serving ``request`` (set once its lifespan has started)."""
    return request.app.state.services
