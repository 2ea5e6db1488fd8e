"""Reading a request's input: multipart or JSON bodies, parameter bounds, and decoding off the event loop.

Every problem is raised as an HTTP-mapped exception (HTTPException, RequestValidationError,
DecodeError, UnknownModel), so bad input is answered with a 4xx and a message, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import typing
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.decoding import DecodeError, decode_array, decode_base64, decode_image
from service.engine.models import LoadedModel
from service.http.schemas import CertifyParams, CommonParams, JobParams
from service.http.state import Services
from service.messages import shown
from service.settings import Settings
from smoothing.procedures import Question, api_question

MAX_FORM_FIELDS = 16
INLINE_DECODE_BYTES = 16 * 1024  # e.g. a 28x28 PNG is under 1 KiB; a 224x224 JPEG is tens of KiB

P = TypeVar("P", bound=CommonParams)
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Payload:
    """The input as sent: encoded image bytes (as such or in base64), or raw values with their shape."""

    image: bytes | None = None
    image_base64: str | None = None
    array: list | None = None
    shape: list[int] | None = None


def validated(model: type[M], data: dict[str, Any] | bytes) -> M:
    """``data`` (form fields, or JSON bytes) as ``model``, strictly; a RequestValidationError (422) if invalid.

    Strict: an integer is an integer (not 1.0 or "1"), a boolean is true or false (not 0). Form fields
    are text, so those of numeric and boolean parameters are read as JSON values first (``form_values``).
    Only request parsing turns pydantic errors into 422: one anywhere else is a server bug (500).
    """
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data, strict=True)
        return model.model_validate(form_values(model, data), strict=True)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def form_values(model: type[BaseModel], fields: dict[str, str]) -> dict[str, Any]:
    """Form text as the JSON value it spells for parameters that are not text ("32" → 32, "true" → True,
    "1.0" → 1.0, which a strict integer then refuses); text parameters and unknown fields stay as sent."""
    values: dict[str, Any] = {}
    for name, text in fields.items():
        field = model.model_fields.get(name)
        values[name] = text
        if field is not None and not _is_text(field.annotation):
            with contextlib.suppress(ValueError):  # not a JSON value: the strict check names the expected type
                values[name] = json.loads(text)
    return values


def _is_text(annotation: Any) -> bool:
    """Whether a field takes text: str, a Literal of strings, or either or None."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(v, str) for v in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool(args) and all(_is_text(a) for a in args)


async def read_form(request: Request, params: type[M]) -> tuple[M, str, bytes]:
    """A multipart body: its fields validated as ``params``, and the name and bytes of its file 'file'."""
    async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:  # closes spooled files on exit
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "a multipart request needs a file upload in the field 'file'")
        names = [k for k, _ in form.multi_items()]
        repeated = sorted({shown(k) for k in names if names.count(k) > 1})
        if repeated:
            raise HTTPException(422, f"form fields given more than once: {', '.join(repeated)} (send each once)")
        # Empty form fields mean "use the default", as an HTML form sends them.
        fields = {k: v for k, v in form.multi_items() if k != "file" and v != ""}
        filename, data = upload.filename or "", await upload.read()
    return validated(params, fields), filename, data


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_input(request: Request, params: type[P], json_body: type[P]) -> tuple[P, Payload]:
    """The parameters and the input of a predict/certify request, multipart or JSON."""
    media_type = media_type_of(request)
    if media_type == "multipart/form-data":
        form_params, _, data = await read_form(request, params)
        return form_params, Payload(image=data)
    if media_type == "application/json" or media_type.endswith("+json"):
        body = validated(json_body, await request.body())
        return body, Payload(image_base64=body.image_base64, array=body.array, shape=body.shape)
    raise HTTPException(
        415,
        f"unsupported content type {shown(media_type) if media_type else '(none)'}: send multipart/form-data "
        "with the image in 'file', or application/json with image_base64 or array + shape",
    )


def certify_question(params: CertifyParams | JobParams, sigma: float, settings: Settings) -> Question:
    """The procedure a certify request (or a job's every image) asks for, the server's defaults filled in and
    n0 and n bounded by CERTSERVE_MAX_N (422 beyond). The radius decision has its own default n0."""
    n = bounded("n", params.n or settings.default_n, settings.max_n)
    alpha = settings.default_alpha if params.alpha is None else params.alpha
    question = api_question(
        params.mode,
        sigma=sigma,
        alpha=alpha,
        n0=params.n0 or settings.default_n0,
        n=n,
        radius=params.radius,
        tolerance=params.tolerance,
    )
    if question.mode == "radius" and params.n0 is None:
        question = replace(question, n0=settings.default_radius_n0)
    return replace(question, n0=bounded("n0", question.n0, settings.max_n))


def bounded(name: str, value: int, maximum: int) -> int:
    """``value`` if at most ``maximum``, else a 422 naming the limit."""
    if value > maximum:
        raise HTTPException(422, f"{name} = {shown(value)} is above the service's limit of {maximum} (CERTSERVE_MAX_N)")
    return value


def decode_payload(payload: Payload, loaded: LoadedModel, settings: Settings, resize: bool) -> torch.Tensor:
    """The model input (C, H, W) in [0, 1]; DecodeError for bad input. CPU work: run it off the event loop."""
    input_shape = loaded.manifest.input_shape
    image = decode_base64(payload.image_base64) if payload.image_base64 is not None else payload.image
    if image is not None:
        return decode_image(image, input_shape=input_shape, max_pixels=settings.max_image_pixels, resize=resize)
    if payload.array is None or payload.shape is None:
        raise DecodeError(422, "no input: give image_base64, or array with shape")
    return decode_array(payload.array, payload.shape, input_shape=input_shape, resize=resize)


async def prepare(svc: Services, params: CommonParams, payload: Payload) -> tuple[LoadedModel, torch.Tensor]:
    """The model the request names (404 if unknown) and the decoded input."""
    loaded = svc.engine.model(params.model or svc.default_model)
    if payload_size(payload) <= INLINE_DECODE_BYTES:  # decoding a small image costs less than a thread hop
        return loaded, decode_payload(payload, loaded, svc.settings, params.resize)
    x = await asyncio.to_thread(decode_payload, payload, loaded, svc.settings, params.resize)
    return loaded, x


def payload_size(payload: Payload) -> int:
    """Bytes the decoder will have to read (for a raw array: its float32 size as declared)."""
    if payload.image is not None:
        return len(payload.image)
    if payload.image_base64 is not None:
        return len(payload.image_base64)
    return 4 * math.prod(payload.shape or ())
