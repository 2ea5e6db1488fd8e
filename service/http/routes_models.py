"""The /v1/models routes: what the service can answer with, and how fast."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.engine.models import LoadedModel
from service.http.auth import require_key
from service.http.schemas import ErrorResponse, ModelInfo, ModelList
from service.http.state import services

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], tags=["models"])


def model_info(loaded: LoadedModel) -> ModelInfo:
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
    )


@router.get("/models", response_model=ModelList, summary="The loaded models")
async def list_models(request: Request) -> ModelList:
    return ModelList(models=[model_info(m) for m in services(request).engine.models.values()])


@router.get(
    "/models/{model_id}",
    response_model=ModelInfo,
    summary="One loaded model",
    responses={404: {"model": ErrorResponse, "description": "unknown model"}},
)
async def get_model(request: Request, model_id: str) -> ModelInfo:
    return model_info(services(request).engine.model(model_id))
