"""Every HTTP response counted by route, status code and cause (``certserve_http_responses_total``).

The status alone does not name every cause (a 503 is a full queue or an unreachable job store),
so an error handler that knows more calls ``mark_cause``; the middleware reads it when the
response starts. An exception that escapes every handler becomes a 500 further out (Starlette's
ServerErrorMiddleware), so the middleware counts it as one itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

CAUSE_KEY = "certserve.failure_cause"
UNMATCHED = "unmatched"  # a path no route serves (404s of scanners must not add a series per path)


def mark_cause(request: Request, cause: str) -> None:
    """Name the cause of the error response being built for ``request`` (e.g. "queue_full")."""
    request.scope[CAUSE_KEY] = cause


def route_templates(routes: Iterable[BaseRoute]) -> list[tuple[re.Pattern[str], str]]:
    """(path regex, template) of every route, those of included routers too."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included router keeps its routes there
        if inner is not None:
            found += route_templates(inner.routes)
        elif isinstance(route, Route):
            found.append((route.path_regex, route.path))
    return found


class ResponseMetrics:
    """ASGI middleware counting each HTTP response once, with its route, status code and cause."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def route_of(self, scope: Scope) -> str:
        """The template of the route that served (or would serve) ``scope``, e.g. "/v1/jobs/{job_id}"."""
        route = scope.get("route")
        if isinstance(route, Route):
            return route.path
        # Not routed (answered before routing, like the body limit's 413, or no route matched): match the path.
        if self._templates is None:
            self._templates = route_templates(getattr(scope.get("app"), "routes", ()))
        path = scope.get("path", "")
        return next((template for regex, template in self._templates if regex.match(path)), UNMATCHED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                metrics.record_response(self.route_of(scope), message["status"], scope.get(CAUSE_KEY))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                metrics.record_response(self.route_of(scope), 500, "server_error")
            raise
