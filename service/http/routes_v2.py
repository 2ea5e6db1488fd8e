"""The Open Inference Protocol (KServe v2 REST) over the same engine, cache and answers as /v1.

``POST /v2/models/{name}/infer`` takes one FP32 input tensor, [C, H, W] or [N, C, H, W] in [0, 1],
as JSON ``data`` or raw little-endian bytes after the JSON (the protocol's binary tensor
extension, which ``tritonclient`` uses by default). The request's ``parameters`` carry the
smoothing settings (mode predict | fixed | adaptive, n0, n, alpha, radius, tolerance, seed);
each of the N inputs is answered by the very function /v1 answers with (cache included), and
the outputs are one row per input: label (-1 = abstained), radius, p_a_lower, abstained, counts,
and ``answer``, the whole /v1 answer as JSON (the fields the protocol has no tensor for).
Errors are ``{"error": "..."}`` as the protocol says (service.http.app).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any

import torch
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from service.decoding import UNPROCESSABLE
from service.engine.models import LoadedModel
from service.http.auth import require_key
from service.http.inputs import INLINE_DECODE_BYTES, validated
from service.http.routes_smoothing import certify_input, predict_input, until_disconnected
from service.http.schemas import CertifyParams, PredictParams
from service.http.schemas_v2 import (
    INPUT_DATATYPE,
    INPUT_NAME,
    ErrorV2,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    TensorMetadata,
)
from service.http.state import Services, services
from service.http.tensors_v2 import CERTIFY_OUTPUTS, PREDICT_OUTPUTS, Answer, OutputSpec, input_tensors, output_tensor

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's header
PLATFORM = "randomized-smoothing"
TRITON_BATCH_LEVEL = 2  # Triton's integer priorities: 0 = default, 1 = most urgent; from this level on: batch
MODES = ("predict", "fixed", "adaptive")

router = APIRouter(
    prefix="/v2",
    dependencies=[Depends(require_key)],
    responses={code: {"model": ErrorV2} for code in (401, 403, 404, 413, 422, 503, 504)},
    tags=["open inference protocol (v2)"],
)


def model_of(svc: Services, name: str, version: str | None) -> LoadedModel:
    """The loaded model ``name`` (404 if unknown); a ``version`` must be its checkpoint's sha256."""
    loaded = svc.engine.model(name)
    if version is not None and version != loaded.manifest.sha256:
        raise HTTPException(404, f"model {name!r} has no version {version!r}; its version is {loaded.manifest.sha256}")
    return loaded


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/models/{name}", response_model=ModelMetadata, summary="Model metadata: its input and outputs")
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def model_metadata(request: Request, name: str, version: str | None = None) -> ModelMetadata:
    svc = services(request)
    manifest = model_of(svc, name, version).manifest
    classes = len(manifest.classes)
    outputs = {**PREDICT_OUTPUTS, **CERTIFY_OUTPUTS}
    settings = svc.settings
    return ModelMetadata(
        name=manifest.id,
        versions=[manifest.sha256],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=list(manifest.input_shape))],
        outputs=[
            TensorMetadata(name=k, datatype=spec.datatype, shape=[-1, classes] if spec.per_class else [-1])
            for k, spec in outputs.items()
        ],
        parameters={
            "sigma": manifest.sigma,
            "classes": manifest.classes,
            "modes": list(MODES),
            "defaults": {
                "mode": "fixed",
                "n0": settings.default_n0,
                "n": settings.default_n,
                "predict_n": settings.default_predict_n,
                "alpha": settings.default_alpha,
            },
        },
    )


@router.get(
    "/models/{name}/ready",
    response_model=ModelReady,
    summary="Model readiness: 200 when loaded and an executor runs",
    responses={503: {"model": ModelReady}},
)
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, include_in_schema=False)
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    svc = services(request)
    manifest = model_of(svc, name, version).manifest
    ready = svc.pool.alive  # at least one executor of the pool runs
    return JSONResponse(ModelReady(name=manifest.id, ready=ready).model_dump(), status_code=200 if ready else 503)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    summary="Inference: PREDICT or CERTIFY on each input of the tensor",
    description="The input: one FP32 tensor [C, H, W] (the model's shape) or [N, C, H, W], pixel values in "
    "[0, 1], as JSON `data` or as binary data after the JSON (header Inference-Header-Content-Length). "
    "`parameters`: mode (predict, fixed or adaptive; default fixed), n0, n, alpha, radius, tolerance, seed, "
    "meaning what they mean on /v1/predict and /v1/certify, with the same defaults and the same cache. "
    "Outputs, one row per input: label (-1 when abstaining), abstained, and for predict p_value and counts, "
    "for certify radius, p_a_lower, certified_at_radius, selection_counts, estimation_counts and samples; "
    "`answer` (BYTES) holds each input's whole /v1 answer as JSON.",
)
@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, include_in_schema=False)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    started = time.perf_counter()
    svc = services(request)
    loaded = model_of(svc, name, version)
    body, binary = await read_infer_request(request)
    mode, params = smoothing_params(body.parameters or {})
    inputs = await decode_inputs(body, binary, loaded, params.resize)
    core = predict_input if mode == "predict" else certify_input
    work = all_or_nothing([core(svc, loaded, x, params, started) for x in inputs])
    answers = await until_disconnected(request, work)
    specs = PREDICT_OUTPUTS if mode == "predict" else CERTIFY_OUTPUTS
    return infer_response(body, loaded, mode, specs, answers)


async def read_infer_request(request: Request) -> tuple[InferRequest, bytes]:
    """The JSON part of the body as an InferRequest, and the binary tensor data after it (or b"")."""
    raw = await request.body()
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return validated(InferRequest, raw), b""
    if not declared.isdigit() or int(declared) > len(raw):
        raise HTTPException(UNPROCESSABLE, f"{HEADER_LENGTH} {declared!r} is not a length within the body")
    length = int(declared)
    return validated(InferRequest, raw[:length]), raw[length:]


def smoothing_params(raw: dict[str, Any]) -> tuple[str, PredictParams | CertifyParams]:
    """The mode and its /v1 parameters from the request's ``parameters`` (422 for unknown or invalid ones)."""
    fields = {k: v for k, v in raw.items() if k not in ("binary_data_output", "timeout", "priority")}
    fields |= triton_control(raw)
    mode = fields.pop("mode", "fixed")
    if mode not in MODES:
        raise HTTPException(UNPROCESSABLE, f"parameters.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if "model" in fields:
        raise HTTPException(UNPROCESSABLE, "parameters.model is not allowed: the model is the one in the URL")
    # The parameters arrived as JSON: validated as /v1's JSON bodies are (strictly), not as form text.
    if mode == "predict":
        return mode, validated(PredictParams, json.dumps(fields).encode())
    return mode, validated(CertifyParams, json.dumps({**fields, "mode": mode}).encode())


def triton_control(raw: dict[str, Any]) -> dict[str, Any]:
    """Triton's request controls as /v1's: ``priority`` (an integer level, or interactive | batch) and
    ``timeout`` (microseconds) become ``priority`` and ``timeout_s``."""
    control: dict[str, Any] = {}
    priority = raw.get("priority")
    if isinstance(priority, int) and not isinstance(priority, bool):
        control["priority"] = "batch" if priority >= TRITON_BATCH_LEVEL else "interactive"
    elif priority is not None:
        control["priority"] = priority  # validated as /v1's
    timeout = raw.get("timeout")
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise HTTPException(UNPROCESSABLE, "parameters.timeout must be a positive number of microseconds")
        control["timeout_s"] = timeout / 1e6
    return control


async def decode_inputs(body: InferRequest, binary: bytes, loaded: LoadedModel, resize: bool) -> list[torch.Tensor]:
    """The request's input tensor as model inputs (C, H, W); decoded off the event loop when large."""
    if len(binary) <= INLINE_DECODE_BYTES and (len(body.inputs) != 1 or len(body.inputs[0].data or ()) < 4096):
        return input_tensors(body, binary, loaded.manifest.input_shape, resize)
    return await asyncio.to_thread(input_tensors, body, binary, loaded.manifest.input_shape, resize)


async def all_or_nothing(work: list[Coroutine[Any, Any, Answer]]) -> list[Answer]:
    """Every coroutine's result; the first failure cancels the others and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in work]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def infer_response(
    body: InferRequest, loaded: LoadedModel, mode: str, specs: dict[str, OutputSpec], answers: list[Answer]
) -> Response:
    """The outputs asked for (default: all of the mode's), as JSON data or binary data after the JSON."""
    request_parameters = body.parameters or {}
    wanted = [(o.name, bool((o.parameters or {}).get("binary_data"))) for o in body.outputs or ()]
    if not wanted:
        all_binary = bool(request_parameters.get("binary_data_output"))
        wanted = [(name, all_binary) for name in specs if name != "certified_at_radius" or _decision(answers)]
    unknown = [name for name, _ in wanted if name not in specs]
    if unknown:
        raise HTTPException(UNPROCESSABLE, f"unknown outputs {unknown} for mode {mode}; outputs: {', '.join(specs)}")
    outputs, blobs = [], []
    for name, binary in wanted:
        output, blob = output_tensor(name, specs[name], answers, binary)
        outputs.append(output)
        blobs.extend([blob] if blob is not None else [])
    response = InferResponse(
        model_name=loaded.manifest.id,
        model_version=loaded.manifest.sha256,
        id=body.id,
        parameters={"mode": mode},
        outputs=outputs,
    )
    header = response.model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))}
    )


def _decision(answers: list[Answer]) -> bool:
    return any(getattr(a, "target_radius", None) is not None for a in answers)
