"""Shutting down without 500s: requests still running when the grace period ends get a JSON 503.

On SIGTERM uvicorn stops accepting connections and waits ``shutdown_grace_s`` for requests in
flight, then cancels them, which a client sees as a plain-text 500. ``Drain.begin`` (called by
``python -m service`` as uvicorn's shutdown starts) arms a deadline ``ANSWER_MARGIN_S`` before the
grace ends; ``ShutdownGuard`` answers every request still computing at that deadline with 503,
``Retry-After`` and the documented ``{"detail": ...}`` body (its work is cancelled, so the
scheduler drops it), and refuses new ``POST /v1`` work at once while draining: it could not finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

ANSWER_MARGIN_S = 1.0  # answered this long before the grace ends (at most a fifth of the grace)
RETRY_AFTER_S = 5  # a restarted replica is typically serving again within seconds


class Drain:
    """Whether the service is shutting down, and the moment by which running requests must be answered."""

    def __init__(self) -> None:
        self.draining = False
        self._answer_now: asyncio.Future[None] | None = None

    def answer_now(self) -> asyncio.Future[None]:
        """A future of the running loop that resolves when running requests must be answered (never, until
        ``begin``); a new loop (a test client's) gets its own."""
        loop = asyncio.get_running_loop()
        if self._answer_now is None or self._answer_now.get_loop() is not loop:
            self._answer_now = loop.create_future()
        return self._answer_now

    def begin(self, grace_s: float) -> None:
        """Start draining (call on the event loop): running requests are answered 503 before ``grace_s`` ends."""
        if self.draining:
            return
        self.draining = True
        wait_s = grace_s - min(ANSWER_MARGIN_S, grace_s / 5)
        log.info("draining: requests still running in %.1f s will be answered 503", wait_s)
        future = self.answer_now()
        asyncio.get_running_loop().call_later(wait_s, lambda: future.done() or future.set_result(None))


def unavailable_body(reason: str) -> bytes:
    return json.dumps({"detail": f"the service is shutting down ({reason}); retry in {RETRY_AFTER_S} s"}).encode()


class ShutdownGuard:
    """ASGI middleware: JSON 503 + Retry-After for what cannot finish before the shutdown grace ends."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await _answer_503(send, "no new work is accepted")
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        answer_now = self.drain.answer_now()
        try:
            await asyncio.wait({task, answer_now}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            task.result()  # re-raise what the app raised, as without this guard
            return
        task.cancel()  # the grace is ending: drop the request's work and say so
        await asyncio.gather(task, return_exceptions=True)
        if not started:
            await _answer_503(send, "the request could not finish within the shutdown grace period")


async def _answer_503(send: Send, reason: str) -> None:
    body = unavailable_body(reason)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(math.ceil(RETRY_AFTER_S)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
