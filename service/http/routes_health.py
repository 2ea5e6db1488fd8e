"""Health and metrics routes; they stay open when API keys are configured.

Liveness depends on nothing (the process answers); readiness needs the models loaded, the
executor thread alive and, when configured, Redis answering a ping.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics as service_metrics
from service.cache import RedisCache
from service.http.schemas import Health, Readiness
from service.http.state import Services
from service.jobs.store import RedisJobStore

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (depends on neither models nor Redis)")
@router.get("/v2/health/live", response_model=Health, summary="Liveness, KServe v2 path")
async def live() -> Health:
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: a check failed"}},
    summary="Readiness: models loaded, executor running, Redis reachable when configured",
)
@router.get("/v2/health/ready", response_model=Readiness, summary="Readiness, KServe v2 path")
async def ready(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "services", None)
    if svc is None:  # still starting
        checks = {"models_loaded": False, "executor_alive": False}
    else:
        checks = {"models_loaded": bool(svc.engine.models), "executor_alive": svc.executor.alive}
        if isinstance(svc.cache, RedisCache):
            checks["redis"] = await svc.cache.ping()
    ok = all(checks.values())
    body = Readiness(status="ready" if ok else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


async def refresh_store_metrics(svc: Services) -> None:
    """What only the stores know, read at each scrape: jobs by state, the job backlog, Redis reachability."""
    jobs_readable = await svc.jobs.refresh_metrics()
    if isinstance(svc.jobs.store, RedisJobStore):
        service_metrics.REDIS_UP.labels("jobs").set(jobs_readable)
    if isinstance(svc.cache, RedisCache):
        service_metrics.REDIS_UP.labels("cache").set(await svc.cache.ping())


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    description="The job and Redis gauges are read from the stores at each scrape (bounded to about a second).",
)
async def metrics(request: Request) -> Response:
    svc = getattr(request.app.state, "services", None)
    if svc is not None:
        await refresh_store_metrics(svc)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
