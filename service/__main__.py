"""``python -m service``: serve the API with uvicorn on CERTSERVE_HOST:CERTSERVE_PORT."""

from __future__ import annotations

import logging

import uvicorn

from service.http.app import create_app
from service.settings import Settings
from smoothing.tuning import keep_freed_memory


def main() -> None:
    keep_freed_memory()  # before the first large allocation: set later, it helped less (bench/findings.md)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        access_log=settings.access_log,
        log_level="info",
    )


if __name__ == "__main__":
    main()
