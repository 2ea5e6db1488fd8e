"""Health and metrics routes; they stay open when API keys are configured.

Liveness depends on nothing (the process answers); readiness needs the models loaded and at
least one executor of the pool alive (the body lists every device, a failed one with its error:
the others serve on). Redis (when configured) is reported but does not fail readiness: without
it every predict and certify is still answered (the certificate cache is skipped), so pulling the
replica would lose capacity for nothing. While it is down the answer says "degraded" and which
routes are affected: the job routes answer 503 + Retry-After, and running jobs wait for it.
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

REDIS_DOWN = (
    "redis unreachable: certificates are computed but not cached; /v1/jobs routes answer 503 with Retry-After; "
    "running jobs wait and resume once Redis is back"
)


@router.get("/healthz", response_model=Health, summary="Liveness (depends on neither models nor Redis)")
@router.get("/v2/health/live", response_model=Health, summary="Liveness, KServe v2 path")
async def live() -> Health:
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: models not loaded or no executor alive"}},
    summary="Readiness: models loaded and an executor running, each device listed (200, 'degraded' when only "
    "Redis is down)",
)
@router.get("/v2/health/ready", response_model=Readiness, summary="Readiness, KServe v2 path")
async def ready(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "services", None)
    devices = []
    if svc is None:  # still starting
        checks = {"models_loaded": False, "executor_alive": False}
    else:
        checks = {"models_loaded": bool(svc.engine.models), "executor_alive": svc.pool.alive}
        devices = svc.pool.devices()
    ok = all(checks.values())
    degraded = []
    if svc is not None and isinstance(svc.cache, RedisCache):
        checks["redis"] = await svc.cache.ping()
        if not checks["redis"]:
            degraded.append(REDIS_DOWN)
    status = "not ready" if not ok else "degraded" if degraded else "ready"
    body = Readiness(status=status, checks=checks, degraded=degraded, devices=devices)
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
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "metrics"}},
)
async def metrics(request: Request) -> Response:
    svc = getattr(request.app.state, "services", None)
    if svc is not None:
        await refresh_store_metrics(svc)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
