"""The /v1 routes for predictions and certificates.

A request's path: read the body (multipart file upload or JSON) → validate the parameters
against the configured defaults and bounds → decode the input off the event loop → (certify)
consult the certificate cache → hand the work to the engine and wait, cancelling it if the
client goes away → answer with the decision, its counts and where the time went.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from service import metrics
from service.auth import require_key
from service.cache import certificate_key
from service.engine import Timing
from service.executor import LoadedModel
from service.inputs import bounded, prepare, read_input
from service.schemas import (
    RADIUS_UNITS,
    CertifyJson,
    CertifyParams,
    CertifyResponse,
    CommonParams,
    ErrorResponse,
    PredictJson,
    PredictParams,
    PredictResponse,
)
from service.state import services
from smoothing.core import Certificate, Prediction

DISCONNECT_POLL_S = 0.1  # how often a waiting request checks whether its client is still there

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "API keys are configured and none was sent",
        403: "the API key is not valid",
        404: "unknown model",
        413: "request body or decoded image too large",
        415: "unsupported content type or undecodable image",
        422: "invalid parameters or input (wrong shape, NaN, out of range, ...)",
        503: "too much work queued; retry after the Retry-After header's seconds",
        504: "the request's deadline passed; its remaining work was dropped",
    }.items()
}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES, tags=["smoothing"])

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away while its request was computing; the work was cancelled."""


def form_schema(params: type[BaseModel], file_description: str) -> dict[str, Any]:
    """OpenAPI schema of a multipart body: the file 'file' and ``params`` as form fields."""
    schema = params.model_json_schema()
    file_field = {"type": "string", "format": "binary", "description": file_description}
    return {**schema, "properties": {"file": file_field, **schema["properties"]}, "required": ["file"]}


def request_body_doc(params: type[CommonParams], json_body: type[CommonParams]) -> dict[str, Any]:
    """OpenAPI text for a body that is either a multipart upload (field ``file``) or JSON."""
    content = {
        "multipart/form-data": {"schema": form_schema(params, "the image (PNG, JPEG, ...)")},
        "application/json": {"schema": json_body.model_json_schema()},
    }
    return {"requestBody": {"required": True, "content": content}}


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (and raise ClientDisconnected) if the client goes away meanwhile.

    Cancelling reaches the scheduler, which drops the request's remaining samples.
    """
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise ClientDisconnected()
        return task.result()
    finally:
        task.cancel()  # no-op once done; stops the work if we were cancelled or the client left


def answer_fields(loaded: LoadedModel, label: int | None, timing: Timing, cached: bool) -> dict[str, Any]:
    """The fields every answer has beside the decision's own (which come from its dataclass)."""
    manifest = loaded.manifest
    return {
        "model": manifest.id,
        "checkpoint_sha256": manifest.sha256,
        "class_name": None if label is None else manifest.classes[label],
        "abstained": label is None,
        "cached": cached,
        "queued_s": timing.queued_s,
        "compute_s": timing.compute_s,
    }


def predict_answer(prediction: Prediction, loaded: LoadedModel, timing: Timing) -> PredictResponse:
    return PredictResponse(**asdict(prediction), **answer_fields(loaded, prediction.label, timing, cached=False))


def certify_answer(certificate: Certificate, loaded: LoadedModel, timing: Timing, cached: bool) -> CertifyResponse:
    return CertifyResponse(**asdict(certificate), **answer_fields(loaded, certificate.label, timing, cached))


def certificate_from_cache(stored: dict[str, Any]) -> Certificate | None:
    """The cached certificate, or None if the entry does not have the layout this version writes."""
    try:
        return Certificate(**stored)
    except TypeError:
        return None


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="PREDICT: the smoothed classifier's label, or an abstention",
    description="Counts the base classifier's labels on n noisy copies of the input (Gaussian noise of the model's "
    "σ) and returns the top class if a two-sided binomial test of the top two counts rejects a tie at level α; "
    "otherwise it abstains. With probability at least 1 - α a returned label is the smoothed classifier's. "
    "Send the image as multipart/form-data (field `file`, parameters as form fields) or JSON "
    "(`image_base64`, or `array` + `shape`, parameters as keys).",
    openapi_extra=request_body_doc(PredictParams, PredictJson),
)
async def predict(request: Request) -> PredictResponse:
    started = time.perf_counter()
    svc = services(request)
    settings = svc.settings
    params, payload = await read_input(request, PredictParams, PredictJson)
    n = bounded("n", params.n or settings.default_predict_n, settings.max_n)
    alpha = settings.default_alpha if params.alpha is None else params.alpha
    loaded, x = await prepare(svc, params, payload)
    model_id = loaded.manifest.id
    prediction, timing = await until_disconnected(
        request, svc.engine.predict(model_id, x, n=n, alpha=alpha, seed=params.seed)
    )
    metrics.record_prediction(model_id, prediction, time.perf_counter() - started, timing)
    return predict_answer(prediction, loaded, timing)


@router.post(
    "/certify",
    response_model=CertifyResponse,
    summary="CERTIFY: a label with a certified ℓ2 radius, or an abstention",
    description="Picks the top class from n0 noisy copies, then bounds its probability from below with n independent "
    "copies (one-sided Clopper-Pearson at level α) and certifies radius σ·Φ⁻¹(p̲A); abstains when p̲A ≤ 1/2. "
    "With probability at least 1 - α the smoothed classifier's label is constant within the radius. "
    + RADIUS_UNITS
    + " Answers are cached by (checkpoint, σ, n0, n, α, input), not by seed: asking again with any seed "
    "returns the stored certificate (cached=true).",
    openapi_extra=request_body_doc(CertifyParams, CertifyJson),
)
async def certify(request: Request) -> CertifyResponse:
    started = time.perf_counter()
    svc = services(request)
    settings = svc.settings
    params, payload = await read_input(request, CertifyParams, CertifyJson)
    n0 = bounded("n0", params.n0 or settings.default_n0, settings.max_n)
    n = bounded("n", params.n or settings.default_n, settings.max_n)
    alpha = settings.default_alpha if params.alpha is None else params.alpha
    loaded, x = await prepare(svc, params, payload)
    manifest = loaded.manifest
    key = certificate_key(checkpoint_sha256=manifest.sha256, sigma=manifest.sigma, n0=n0, n=n, alpha=alpha, x=x)
    stored = await svc.cache.get(key)
    certificate = None if stored is None else certificate_from_cache(stored)
    if certificate is not None:
        metrics.record_certificate(manifest.id, certificate, time.perf_counter() - started, None)
        return certify_answer(certificate, loaded, Timing(), cached=True)
    certificate, timing = await until_disconnected(
        request, svc.engine.certify(manifest.id, x, n0=n0, n=n, alpha=alpha, seed=params.seed)
    )
    await svc.cache.put(key, asdict(certificate))
    metrics.record_certificate(manifest.id, certificate, time.perf_counter() - started, timing)
    return certify_answer(certificate, loaded, timing, cached=False)
