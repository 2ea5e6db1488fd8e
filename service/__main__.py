"""``python -m service``: serve the API with uvicorn on CERTSERVE_HOST:CERTSERVE_PORT.

The uvicorn limits (keep-alive, concurrency, graceful shutdown) come from the settings; when the
shutdown starts the app's ``Drain`` is armed, so that requests still running as the grace period
ends are answered 503 in JSON instead of being cut off (service.http.shutdown).
"""

from __future__ import annotations

import logging

import uvicorn

from service.http.app import create_app
from service.http.shutdown import Drain
from service.settings import Settings
from smoothing.runtime import keep_freed_memory


class DrainingServer(uvicorn.Server):
    """uvicorn's server, arming the app's drain as its shutdown begins."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def shutdown(self, sockets: list | None = None) -> None:
        self.drain.begin(self.grace_s)
        await super().shutdown(sockets)


def main() -> None:
    keep_freed_memory()  # before the first large allocation: set later, it helped less (bench/findings.md)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        access_log=settings.access_log,
        log_level="info",
    )
    DrainingServer(config, drain=app.state.drain, grace_s=settings.shutdown_grace_s).run()


if __name__ == "__main__":
    main()
