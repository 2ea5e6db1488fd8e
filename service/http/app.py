"""The FastAPI application: lifespan wiring, the body-size guard and the JSON error answers.

``create_app(settings)`` returns an app whose lifespan loads the models, starts the scheduler's
executor pool, the certificate cache and the job runner, and stops them in reverse order.
Every error is answered as JSON ``{"detail": "..."}``; bad input never gives a 500.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.cache import make_cache
from service.decoding import DecodeError
from service.engine.engine import UnknownModel
from service.engine.pool import load_settings_models, parse_devices, start_engine
from service.engine.scheduler import DeadlineExceeded, QueueFull
from service.http import routes_health, routes_jobs, routes_models, routes_smoothing, routes_v2
from service.http.response_metrics import ResponseMetrics, mark_cause
from service.http.routes_console import add_console
from service.http.routes_smoothing import ClientDisconnected
from service.http.schemas import RADIUS_UNITS
from service.http.shutdown import Drain, ShutdownGuard
from service.http.state import Services, pick_default_model
from service.jobs.queue import make_enqueue
from service.jobs.runner import RESUME_RETRY_S, STORE_ERRORS, JobRunner
from service.jobs.store import RedisJobStore, SqliteJobStore
from service.jobs.uploads import DecodeBudget, UploadError
from service.messages import MAX_DETAIL, MAX_SHOWN, clipped, shown
from service.settings import Settings
from service.signing import load_private_key

log = logging.getLogger(__name__)
V2_PREFIX = "/v2/"  # the Open Inference Protocol's routes, whose errors are {"error": ...}
T = TypeVar("T")

DESCRIPTION = (
    "Certified predictions by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019). "
    "PREDICT returns the smoothed classifier's label or abstains; CERTIFY also returns a radius within which "
    "the label provably cannot change, each with probability at least 1 - α. " + RADIUS_UNITS
)


async def in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends when it returns (``asyncio.to_thread``'s threads live on)."""
    with ThreadPoolExecutor(1, thread_name_prefix="loader") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Before the minutes of model loading: a bad key file fails the start at once.
    signing_key = None if settings.signing_key_file is None else load_private_key(settings.signing_key_file)
    slots = parse_devices(settings.devices, settings.threads)
    # Loading measures each model's best batch size (seconds of forward passes): keep it off the event loop,
    # on a thread that then exits, taking its OpenMP team with it (see service.engine.executor).
    models = await in_passing_thread(load_settings_models, settings, slots)
    if not any(models.values()):
        raise RuntimeError(f"no models found in {settings.model_dir} (set CERTSERVE_MODEL_DIR or CERTSERVE_MODELS)")
    default_model = pick_default_model(settings, next(loaded for loaded in models.values() if loaded))
    engine, pool = start_engine(settings, slots, models)
    cache = make_cache(settings)
    store = RedisJobStore(settings.redis_url) if settings.redis_url else SqliteJobStore(settings.job_db)
    enqueue, close_broker = make_enqueue(settings) if settings.job_backend == "dramatiq" else (None, None)
    jobs = JobRunner(store, engine, enqueue=enqueue)
    await jobs.start()
    uploads = DecodeBudget(settings.max_decoding_bytes)
    app.state.services = Services(
        settings, engine.scheduler, pool, engine, cache, jobs, uploads, default_model, signing_key
    )
    log.info("serving %s on %s", ", ".join(engine.models), ", ".join(slot.name for slot in slots))
    try:
        yield
    finally:
        await jobs.stop()  # first: its in-flight work needs the executors to finish or be cancelled
        pool.stop()
        await cache.close()
        if close_broker is not None:
            close_broker()


# -- request body limit ---------------------------------------------------------------------------


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than the limit of {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body sent nothing for {timeout_s:g} s (CERTSERVE_BODY_READ_TIMEOUT_S)")


class BodyLimit:
    """ASGI middleware refusing bodies above ``limit_for(scope)`` bytes with 413, and bodies that stall
    for ``read_timeout_s`` between two chunks with 408.

    A declared Content-Length is checked before anything is read; a body sent without one (or
    longer than declared) is counted while the route reads it, which then raises BodyTooLarge.
    """

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[Scope], int], read_timeout_s: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:  # servers reject malformed ones
            await detail(413, str(BodyTooLarge(limit)), path=scope.get("path", ""))(scope, receive, send)
            return
        received, body_done = 0, False

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() waits for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


def body_limit_for(settings: Settings) -> Callable[[Scope], int]:
    """Job uploads get ``max_job_bytes``; every other request ``max_body_bytes``."""

    def limit_for(scope: Scope) -> int:
        is_job_upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/jobs"
        return settings.max_job_bytes if is_job_upload else settings.max_body_bytes

    return limit_for


# -- errors as {"detail": "..."} ------------------------------------------------------------------


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """pydantic/FastAPI validation errors as one line: 'alpha: Input should be less than 0.5 (got 0.7); ...'."""
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")) or "body"
        text = f"{clipped(location, MAX_SHOWN)}: {error.get('msg', 'invalid')}"
        value = error.get("input")
        if error.get("type") != "json_invalid" and isinstance(value, int | float | str):
            text += f" (got {shown(value)})"
        parts.append(text)
    return "; ".join(parts)


def detail(status_code: int, text: str, headers: dict[str, str] | None = None, *, path: str = "") -> JSONResponse:
    """The error answer: ``{"detail": text}``, or ``{"error": text}`` under /v2 as the Open Inference Protocol says."""
    key = "error" if path.startswith(V2_PREFIX) else "detail"
    return JSONResponse({key: clipped(text, MAX_DETAIL)}, status_code=status_code, headers=headers)


def protocol_shaped(handler: Callable[[Request, Any], Any]) -> Callable[[Request, Any], Any]:
    """``handler`` answering /v2 requests in the protocol's error shape (its ``{"detail"}`` as ``{"error"}``)."""

    async def handle(request: Request, error: Exception) -> Response:
        response = await handler(request, error)
        if not request.url.path.startswith(V2_PREFIX) or not isinstance(response, JSONResponse):
            return response
        body = json.loads(response.body)
        if not (isinstance(body, dict) and set(body) == {"detail"}):
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return detail(response.status_code, str(body["detail"]), headers, path=request.url.path)

    return handle


def add_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several
            allow = ", ".join(allowed_methods(request.app, request.scope))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allow})
            return detail(405, f"{request.method} is not allowed here; allowed: {allow}", headers={"Allow": allow})
        return detail(error.status_code, str(error.detail), headers=error.headers)

    async def validation(request: Request, error: RequestValidationError) -> Response:
        return detail(422, describe_validation(list(error.errors())))

    async def decode_error(request: Request, error: DecodeError | UploadError) -> Response:
        retry_after = getattr(error, "retry_after_s", None)
        return detail(
            error.status_code, error.message, None if retry_after is None else {"Retry-After": str(retry_after)}
        )

    async def unknown_model(request: Request, error: UnknownModel) -> Response:
        known = ", ".join(request.app.state.services.engine.models)
        return detail(404, f"unknown model {shown(error.args[0])}; loaded models: {known}")

    async def queue_full(request: Request, error: QueueFull) -> Response:
        mark_cause(request, "queue_full")
        return detail(503, f"server busy: {error}", headers={"Retry-After": str(error.retry_after_s)})

    async def deadline(request: Request, error: DeadlineExceeded) -> Response:
        mark_cause(request, "deadline")
        return detail(
            504,
            f"the request did not finish {error}; its remaining work was dropped (the deadline is the request's "
            f"timeout_s, at most CERTSERVE_REQUEST_TIMEOUT_S = {settings.request_timeout_s:g} s)",
        )

    async def too_large(request: Request, error: BodyTooLarge) -> Response:
        return detail(413, str(error))

    async def body_timeout(request: Request, error: BodyTimeout) -> Response:
        return detail(408, str(error), headers={"Connection": "close"})

    async def disconnected(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=metrics.CLIENT_CLOSED_REQUEST)

    async def store_unreachable(request: Request, error: Exception) -> Response:
        log.warning("job store unreachable on %s %s: %s", request.method, request.url.path, error)
        mark_cause(request, "store_unreachable")
        return detail(
            503,
            f"the job store is unreachable ({type(error).__name__}); retry later",
            headers={"Retry-After": str(int(RESUME_RETRY_S) + 1)},
        )

    async def unexpected(request: Request, error: Exception) -> Response:
        # A bug, never bad input: logged with its traceback (uvicorn logs it too), answered as JSON.
        log.error("unhandled %s on %s %s", type(error).__name__, request.method, request.url.path)
        return detail(500, f"internal error ({type(error).__name__}); the request may be retried")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(DecodeError, decode_error)
    app.add_exception_handler(UploadError, decode_error)
    app.add_exception_handler(UnknownModel, unknown_model)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(DeadlineExceeded, deadline)
    app.add_exception_handler(BodyTooLarge, too_large)
    app.add_exception_handler(BodyTimeout, body_timeout)
    app.add_exception_handler(ClientDisconnected, disconnected)
    for store_error in STORE_ERRORS:
        app.add_exception_handler(store_error, store_unreachable)
    app.add_exception_handler(Exception, unexpected)
    for kind, handler in app.exception_handlers.items():
        app.exception_handlers[kind] = protocol_shaped(handler)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of ``app`` serves at the scope's path, OPTIONS included."""
    served = {
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    }
    return [method for method in HTTP_METHODS if method in served] + ["OPTIONS"]


def openapi_for(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document; without API keys configured it declares no security (nothing asks for a key)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            if not settings.api_keys:
                schema.get("components", {}).pop("securitySchemes", None)
                for operations in schema["paths"].values():
                    for operation in operations.values():
                        operation.pop("security", None)
                        for code in ("401", "403"):
                            operation.get("responses", {}).pop(code, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; ``settings`` default to the environment's (CERTSERVE_*)."""
    settings = settings or Settings()
    app = FastAPI(
        title="certserve",
        summary="Certified predictions by randomized smoothing",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(routes_smoothing.router)
    app.include_router(routes_models.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_health.router)
    app.include_router(routes_v2.router)
    add_console(app)
    add_error_handlers(app, settings)
    app.openapi = openapi_for(app, settings)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit_for=body_limit_for(settings), read_timeout_s=settings.body_read_timeout_s)
    app.state.drain = Drain()
    app.add_middleware(ShutdownGuard, drain=app.state.drain)  # answers for everything inside it
    app.add_middleware(ResponseMetrics)  # outermost of ours: it sees the body limit's 413s and shutdown's 503s too
    return app
