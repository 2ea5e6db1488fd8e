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
from pydantic import BaseModel, ValidationError

from service import metrics
from service.cache import certificate_key
from service.engine.engine import Timing
from service.engine.models import LoadedModel
from service.http.auth import require_key
from service.http.inputs import bounded, prepare, read_input
from service.http.schemas import (
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
from service.http.state import services
from smoothing.core import Certificate, Prediction
from smoothing.sampling import new_seed
from smoothing.sequential import DEFAULT_TOLERANCE, AdaptiveCertificate, RadiusDecision, adaptive_certify, radius_test
from smoothing.statistics import radius_from_lower_bound

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

    Cancelling reaches the scheduler, which drops the request's remaining samples. The client is
    watched by a task parked on the ASGI ``receive`` (which answers ``http.disconnect`` when it
    leaves): waiting requests cost no CPU, where polling ``is_disconnected`` every 100 ms had the
    event loop spend most of its time polling once a thousand predictions were waiting.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientDisconnected()
        return task.result()
    finally:
        task.cancel()  # no-op once done; stops the work if we were cancelled or the client left
        watcher.cancel()


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def fixed_fields(certificate: Certificate, target_radius: float | None) -> dict[str, Any]:
    """The paper's CERTIFY as answer fields; in decision mode, certified at r means radius ≥ r."""
    at_radius = None if target_radius is None else (not certificate.abstained and certificate.radius >= target_radius)
    return {
        **asdict(certificate),
        "mode": "fixed",
        "n_max": certificate.n,
        "samples": certificate.n0 + certificate.n,
        "target_radius": target_radius,
        "certified_at_radius": at_radius,
    }


def sequential_fields(result: AdaptiveCertificate | RadiusDecision, seed: int) -> dict[str, Any]:
    """An adaptive certificate or radius decision as answer fields.

    A decision also reports the radius its last bound certifies (valid like every stage's bound).
    """
    p_a_lower = result.p_a_lower
    certified = p_a_lower > 0.5
    fields = {
        "mode": "adaptive",
        "label": result.top_class if certified else None,
        "p_a_lower": p_a_lower,
        "radius": radius_from_lower_bound(p_a_lower, result.sigma) if certified else 0.0,
        "top_class": result.top_class,
        "selection_counts": list(result.selection_counts),
        "estimation_counts": list(result.estimation_counts),
        "n0": result.n0 if result.samples else 0,
        "n": max(0, result.samples - result.n0),
        "n_max": result.n_max,
        "samples": result.samples,
        "alpha": result.alpha,
        "sigma": result.sigma,
        "seed": seed,
    }
    if isinstance(result, RadiusDecision):
        fields |= {
            "target_radius": result.radius,
            "certified_at_radius": result.certified,
            "max_certifiable_radius": result.max_certifiable_radius,
        }
    return fields


def certify_answer(fields: dict[str, Any], loaded: LoadedModel, timing: Timing) -> CertifyResponse:
    return CertifyResponse(**fields, **answer_fields(loaded, fields["label"], timing, cached=False))


def answer_from_cache(stored: dict[str, Any]) -> CertifyResponse | None:
    """The cached answer, or None if the entry does not have the layout this version writes."""
    try:
        return CertifyResponse(**{**stored, "cached": True, "queued_s": 0.0, "compute_s": 0.0})
    except (ValidationError, TypeError):
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
    + " mode=adaptive samples in stages up to n and stops early with the same guarantee; with `radius`, it "
    "decides whether the input is certified at that radius (certified_at_radius). Answers are cached by "
    "(checkpoint, σ, n0, n, α, mode, radius, tolerance, input), not by seed: asking again with any seed "
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
    tolerance = DEFAULT_TOLERANCE if params.tolerance is None else params.tolerance
    loaded, x = await prepare(svc, params, payload)
    manifest = loaded.manifest
    # The key holds everything that determines the answer (never the seed, so nobody can fish for a lucky one).
    mode_key = params.mode if params.mode == "fixed" or params.radius is not None else f"adaptive:tol={tolerance}"
    key = certificate_key(
        checkpoint_sha256=manifest.sha256,
        sigma=manifest.sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        x=x,
        mode=mode_key,
        radius=params.radius,
    )
    stored = await svc.cache.get(key)
    cached = None if stored is None else answer_from_cache(stored)
    if cached is not None:
        metrics.record_certificate(manifest.id, cached, time.perf_counter() - started, None)
        return cached
    seed = new_seed() if params.seed is None else params.seed
    if params.mode == "fixed":
        work = svc.engine.certify(manifest.id, x, n0=n0, n=n, alpha=alpha, seed=seed)
        certificate, timing = await until_disconnected(request, work)
        fields = fixed_fields(certificate, params.radius)
    else:
        if params.radius is None:
            procedure = adaptive_certify(sigma=manifest.sigma, alpha=alpha, n0=n0, n_max=n, tolerance=tolerance)
        else:
            procedure = radius_test(radius=params.radius, sigma=manifest.sigma, alpha=alpha, n0=n0, n_max=n)
        result, timing = await until_disconnected(
            request, svc.engine.run_sequential(manifest.id, x, procedure, seed=seed)
        )
        fields = sequential_fields(result, seed)
    answer = certify_answer(fields, loaded, timing)
    await svc.cache.put(key, answer.model_dump(exclude={"cached", "queued_s", "compute_s"}))
    metrics.record_certificate(manifest.id, answer, time.perf_counter() - started, timing)
    metrics.record_samples(answer.mode, answer.samples)
    return answer
