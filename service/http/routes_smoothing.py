"""The /v1 routes for predictions and certificates.

A request's path: read the body (multipart file upload or JSON) → validate the parameters
against the configured defaults and bounds → decode the input off the event loop → (certify)
consult the certificate cache → hand the work to the engine and wait, cancelling it if the
client goes away → answer with the decision, its counts and where the time went.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, Literal, TypeVar

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ValidationError

from service import metrics
from service.cache import certificate_key
from service.engine.engine import Timing
from service.engine.models import LoadedModel
from service.engine.scheduler import Priority
from service.http.auth import require_key
from service.http.inputs import bounded, certify_question, prepare, read_input
from service.http.schemas import (
    GUARANTEE,
    RADIUS_UNITS,
    CertifyJson,
    CertifyParams,
    CertifyResponse,
    CommonParams,
    ErrorResponse,
    PredictJson,
    PredictParams,
    PredictResponse,
    SigningKey,
)
from service.http.state import Services, services
from service.signing import SIGNATURE_SCHEME, key_id, public_key_pem, sign
from smoothing.procedures import PROCEDURE_VERSION, Question, certificate_summary
from smoothing.sampling import input_digest, new_seed

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
SeedSource = Literal["server", "client"]


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


def seed_of(params: CommonParams) -> tuple[int, SeedSource]:
    """The request's seed and where it came from: the client's, or fresh server randomness."""
    return (new_seed(), "server") if params.seed is None else (params.seed, "client")


def answer_fields(
    loaded: LoadedModel, x: torch.Tensor, label: int | None, seed: int, seed_source: SeedSource, timing: Timing
) -> dict[str, Any]:
    """The fields every answer has beside the decision's own: the model, the arithmetic, the randomness, the time."""
    manifest = loaded.manifest
    return {
        "model": manifest.id,
        "checkpoint_sha256": manifest.sha256,
        "manifest_digest": loaded.manifest_digest,
        "precision": loaded.precision,
        "procedure": PROCEDURE_VERSION,
        "input_digest": input_digest(x),
        "class_name": None if label is None else manifest.classes[label],
        "abstained": label is None,
        "seed": seed,
        "seed_source": seed_source,
        "cached": False,
        "queued_s": timing.queued_s,
        "compute_s": timing.compute_s,
    }


def at_target(answer: CertifyResponse, target_radius: float | None) -> CertifyResponse:
    """A fixed-mode certificate answering "certified at r?": yes iff it did not abstain and radius ≥ r.

    The target changes neither the samples nor the decision, so it is not part of the cache key:
    the verdict is computed from the (possibly stored) certificate.
    """
    if answer.mode != "fixed" or target_radius is None:
        return answer
    verdict = not answer.abstained and answer.radius >= target_radius
    return answer.model_copy(update={"target_radius": target_radius, "certified_at_radius": verdict})


def scheduling_class(params: CommonParams, interactive: Priority) -> Priority:
    """The scheduler's class of a request: the endpoint's own when interactive, the batch jobs' when batch."""
    return Priority.JOB if params.priority == "batch" else interactive


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
    "(`image_base64`, or `array` + `shape`, parameters as keys). " + GUARANTEE,
    openapi_extra=request_body_doc(PredictParams, PredictJson),
)
async def predict(request: Request) -> PredictResponse:
    started = time.perf_counter()
    svc = services(request)
    params, payload = await read_input(request, PredictParams, PredictJson)
    loaded, x = await prepare(svc, params, payload)
    return await until_disconnected(request, predict_input(svc, loaded, x, params, started))


async def predict_input(
    svc: Services, loaded: LoadedModel, x: torch.Tensor, params: PredictParams, started: float
) -> PredictResponse:
    """PREDICT on a decoded input (C, H, W) in [0, 1], for /v1 and /v2 alike; ``started``: perf_counter at arrival."""
    settings = svc.settings
    n = bounded("n", params.n or settings.default_predict_n, settings.max_n)
    alpha = settings.default_alpha if params.alpha is None else params.alpha
    model_id = loaded.manifest.id
    question = Question("predict", loaded.manifest.sigma, alpha, n)
    seed, seed_source = seed_of(params)
    priority = scheduling_class(params, Priority.PREDICT)
    work = svc.engine.run(model_id, x, question.procedure(), seed=seed, priority=priority, timeout_s=params.timeout_s)
    prediction, timing = await work
    metrics.record_prediction(model_id, prediction, time.perf_counter() - started, timing)
    fields = {**asdict(prediction), **answer_fields(loaded, x, prediction.label, seed, seed_source, timing)}
    return PredictResponse(**fields)


@router.post(
    "/certify",
    response_model=CertifyResponse,
    summary="CERTIFY: a label with a certified ℓ2 radius, or an abstention",
    description="Picks the top class from n0 noisy copies, then bounds its probability from below with n independent "
    "copies (one-sided Clopper-Pearson at level α) and certifies radius σ·Φ⁻¹(p̲A); abstains when p̲A ≤ 1/2. "
    "With probability at least 1 - α the smoothed classifier's label is constant within the radius. "
    + RADIUS_UNITS
    + " mode=adaptive samples in stages up to n and stops early with the same guarantee; with `radius`, it "
    "decides whether the input is certified at that radius (certified_at_radius). " + GUARANTEE,
    openapi_extra=request_body_doc(CertifyParams, CertifyJson),
)
async def certify(request: Request) -> CertifyResponse:
    started = time.perf_counter()
    svc = services(request)
    params, payload = await read_input(request, CertifyParams, CertifyJson)
    loaded, x = await prepare(svc, params, payload)
    return await until_disconnected(request, certify_input(svc, loaded, x, params, started))


async def certify_input(
    svc: Services, loaded: LoadedModel, x: torch.Tensor, params: CertifyParams, started: float
) -> CertifyResponse:
    """CERTIFY on a decoded input (C, H, W) in [0, 1], cache and signature included, for /v1 and /v2 alike."""
    manifest = loaded.manifest
    question = certify_question(params, manifest.sigma, svc.settings)
    seed, seed_source = seed_of(params)
    # Only answers from server randomness are shared: a client's seed neither reads nor writes the cache.
    shared = seed_source == "server"
    key = certificate_key(manifest_digest=loaded.manifest_digest, precision=loaded.precision, question=question, x=x)
    stored = await svc.cache.get(key) if shared else None
    cached = None if stored is None else answer_from_cache(stored)
    if cached is not None:
        metrics.record_certificate(manifest.id, cached.abstained, cached.radius, time.perf_counter() - started, None)
        return at_target(cached, params.radius)
    priority = scheduling_class(params, Priority.CERTIFY)
    procedure = question.procedure()
    work = svc.engine.run(manifest.id, x, procedure, seed=seed, priority=priority, timeout_s=params.timeout_s)
    result, timing = await work
    fields = certificate_summary(result)
    fields |= answer_fields(loaded, x, fields["label"], seed, seed_source, timing)
    if svc.signing_key is not None:
        fields["signed_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        fields["signature"] = sign(fields, svc.signing_key)
    answer = CertifyResponse(**fields)
    if shared:
        await svc.cache.put(key, answer.model_dump(exclude={"cached", "queued_s", "compute_s"}))
    metrics.record_certificate(manifest.id, answer.abstained, answer.radius, time.perf_counter() - started, timing)
    metrics.record_samples(answer.mode, answer.samples)
    return at_target(answer, params.radius)


@router.get(
    "/signing-key",
    response_model=SigningKey,
    summary="The public key that verifies certificate signatures",
    description="Ed25519 public key (PEM) of CERTSERVE_SIGNING_KEY_FILE; a certificate's `signature` covers the "
    "fields listed in service.signing.SIGNED_FIELDS. 404 when the service signs nothing.",
)
async def signing_key(request: Request) -> SigningKey:
    key = services(request).signing_key
    if key is None:
        raise HTTPException(404, "this service does not sign certificates (CERTSERVE_SIGNING_KEY_FILE is not set)")
    public = key.public_key()
    return SigningKey(algorithm=SIGNATURE_SCHEME, key_id=key_id(public), public_key_pem=public_key_pem(public))
