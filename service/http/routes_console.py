"""The web console: a static page at ``/`` (HTML, one script, one stylesheet under /console/).

The page talks to the service only through the public API, with the caller's key from the
browser's session storage. Its Content-Security-Policy allows nothing but this origin, so the
page works (and is tested) without any outside network, and injected markup cannot run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).parent / "console"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console_page() -> FileResponse:
    return FileResponse(
        CONSOLE_DIR / "index.html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


def add_console(app: FastAPI) -> None:
    """Serve the console page at ``/`` and its assets at ``/console/``."""
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")
