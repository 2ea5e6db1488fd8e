"""Health and metrics routes; they stay open when API keys are configured.

Liveness depends on nothing (the process answers); readiness needs the models loaded, the
executor thread alive and, when configured, Redis answering a ping.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.http.schemas import Health, Readiness

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
        if svc.settings.redis_url:
            checks["redis"] = await svc.cache.ping()
    ok = all(checks.values())
    body = Readiness(status="ready" if ok else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
