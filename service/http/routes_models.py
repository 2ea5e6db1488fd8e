"""The /v1/models routes: what the service can answer with, and how fast."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from service.engine.models import LoadedModel
from service.http.auth import require_key
from service.http.inputs import bounded
from service.http.routes_smoothing import ERROR_RESPONSES
from service.http.schemas import CertifiableRadius, ErrorResponse, ModelInfo, ModelList
from service.http.state import services
from smoothing.statistics import certified_radius, lower_confidence_bound

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_key)],
    responses={code: ERROR_RESPONSES[code] for code in (401, 403)},
    tags=["models"],
)


N_QUERY = Query(ge=1, description="estimation samples of max_certifiable_radius; default CERTSERVE_DEFAULT_N")
ALPHA_QUERY = Query(gt=0, lt=0.5, description="α of max_certifiable_radius; default CERTSERVE_DEFAULT_ALPHA")


def model_info(loaded: LoadedModel, n: int, alpha: float) -> ModelInfo:
    """What a client needs to know of a loaded model; its largest certifiable radius at n samples and level α."""
    manifest = loaded.manifest
    return ModelInfo(
        id=manifest.id,
        dataset=manifest.dataset,
        architecture=manifest.architecture,
        sigma=manifest.sigma,
        classes=manifest.classes,
        input_shape=manifest.input_shape,
        sha256=manifest.sha256,
        device=str(loaded.device),
        batch_size=loaded.batch_size,
        interactive_batch_size=loaded.plan.interactive_batch_size,
        samples_per_second=round(loaded.plan.samples_per_second, 1),
        precision=loaded.plan.precision,
        max_certifiable_radius=CertifiableRadius(
            # fixed-mode CERTIFY when all n samples agree: p̲A = α^(1/n)
            radius=certified_radius(lower_confidence_bound(n, n, alpha), manifest.sigma),
            n=n,
            alpha=alpha,
        ),
    )


def radius_params(request: Request, n: int | None, alpha: float | None) -> tuple[int, float]:
    """n and α of the query, or the service's CERTIFY defaults; n bounded by CERTSERVE_MAX_N."""
    settings = services(request).settings
    return bounded("n", n or settings.default_n, settings.max_n), settings.default_alpha if alpha is None else alpha


@router.get("/models", response_model=ModelList, summary="The loaded models")
async def list_models(
    request: Request,
    n: Annotated[int | None, N_QUERY] = None,
    alpha: Annotated[float | None, ALPHA_QUERY] = None,
) -> ModelList:
    n, alpha = radius_params(request, n, alpha)
    return ModelList(models=[model_info(m, n, alpha) for m in services(request).engine.models.values()])


@router.get(
    "/models/{model_id}",
    response_model=ModelInfo,
    summary="One loaded model",
    responses={404: {"model": ErrorResponse, "description": "unknown model"}},
)
async def get_model(
    request: Request,
    model_id: str,
    n: Annotated[int | None, N_QUERY] = None,
    alpha: Annotated[float | None, ALPHA_QUERY] = None,
) -> ModelInfo:
    return model_info(services(request).engine.model(model_id), *radius_params(request, n, alpha))
