"""Each API call as data: the HTTP request to send and how to read its answer.

``Client`` and ``AsyncClient`` differ only in how they send a ``Call`` (blocking or awaited);
what goes into a request and what comes out of it is written once, here. The retry policy
(back-off on 503 honouring Retry-After, and on refused connections) lives here too.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx

from certserve_client.errors import error_from, retry_after
from certserve_client.models import (
    Certificate,
    JobCreated,
    JobResults,
    JobStatus,
    ModelInfo,
    Prediction,
    SigningKey,
)

T = TypeVar("T")
Priority = Literal["interactive", "batch"]
CertifyMode = Literal["fixed", "adaptive"]


class ArrayLike(Protocol):
    """A numpy array or torch tensor of pixel values in [0, 1]: (C, H, W) or (H, W)."""

    shape: Any

    def tolist(self) -> list: ...


ImageLike = str | os.PathLike | bytes | ArrayLike
"""A path to an image file, an encoded image (PNG, JPEG, ...), or raw pixel values in [0, 1]."""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and the parser of its answer (``parse`` is called on 2xx answers only)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    json: Any = None

    def request_kwargs(self) -> dict[str, Any]:
        return {"params": self.params, "data": self.data, "files": self.files, "json": self.json}

    def read(self, response: httpx.Response) -> T:
        """The parsed answer, or the error it is (raised)."""
        if response.is_error:
            raise error_from(response)
        return self.parse(response)


@dataclass(frozen=True)
class RetryPolicy:
    """When to send a request again: after a 503 (waiting Retry-After) or a refused connection.

    Waits grow as ``backoff_s`` × 2^attempt with ±25 % jitter; a Retry-After from the server
    takes precedence when it is longer. A wait beyond ``max_wait_s`` is not waited: the error
    is raised at once (it carries the server's Retry-After). ``retries`` = 0 disables retrying.
    """

    retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0
    jitter: Callable[[], float] = field(default=lambda: random.uniform(0.75, 1.25), repr=False)

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``response`` is the 503 answer, or None when the connection failed.
        """
        if attempt >= self.retries:
            return None
        wait = self.backoff_s * 2**attempt * self.jitter()
        if response is not None:
            wait = max(wait, retry_after(response.headers) or 0.0)
        return wait if wait <= self.max_wait_s else None


def should_retry(response: httpx.Response) -> bool:
    """A 503 (queue full, or the job store briefly unreachable): the request was not taken, resending is safe."""
    return response.status_code == 503


# -- building requests ---------------------------------------------------------------------------------


def _form(fields: dict[str, Any]) -> dict[str, str]:
    """Multipart form fields: None left out (the server's default), booleans as true/false."""
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items() if v is not None}


def _input_body(image: ImageLike, fields: dict[str, Any]) -> dict[str, Any]:
    """Request keyword arguments carrying ``image``: a multipart upload, or JSON for raw pixel values."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return {"files": {"file": (path.name, path.read_bytes(), "application/octet-stream")}, "data": _form(fields)}
    if isinstance(image, bytes | bytearray):
        return {"files": {"file": ("image", bytes(image), "application/octet-stream")}, "data": _form(fields)}
    if hasattr(image, "tolist") and hasattr(image, "shape"):
        body = {k: v for k, v in fields.items() if v is not None}
        return {"json": {**body, "array": image.tolist(), "shape": [int(s) for s in image.shape]}}
    raise TypeError(f"image must be a path, encoded image bytes or an array of pixel values, not {type(image)}")


def _control(priority: Priority | None, timeout_s: float | None) -> dict[str, Any]:
    return {"priority": priority, "timeout_s": timeout_s}


def predict(
    image: ImageLike,
    *,
    model: str | None = None,
    n: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    resize: bool | None = None,
    priority: Priority | None = None,
    timeout_s: float | None = None,
) -> Call[Prediction]:
    fields = {"model": model, "n": n, "alpha": alpha, "seed": seed, "resize": resize, **_control(priority, timeout_s)}
    return Call("POST", "/v1/predict", lambda r: Prediction.from_json(r.json()), **_input_body(image, fields))


def certify(
    image: ImageLike,
    *,
    model: str | None = None,
    mode: CertifyMode | None = None,
    n0: int | None = None,
    n: int | None = None,
    alpha: float | None = None,
    radius: float | None = None,
    tolerance: float | None = None,
    seed: int | None = None,
    resize: bool | None = None,
    priority: Priority | None = None,
    timeout_s: float | None = None,
) -> Call[Certificate]:
    fields = {
        "model": model,
        "mode": mode,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "radius": radius,
        "tolerance": tolerance,
        "seed": seed,
        "resize": resize,
        **_control(priority, timeout_s),
    }
    return Call("POST", "/v1/certify", lambda r: Certificate.from_json(r.json()), **_input_body(image, fields))


def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: [ModelInfo.model_validate(m) for m in r.json()["models"]])


def model(model_id: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{model_id}", lambda r: ModelInfo.model_validate(r.json()))


def submit_job(
    images: str | os.PathLike | bytes,
    *,
    filename: str | None = None,
    model: str | None = None,
    n0: int | None = None,
    n: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    mode: CertifyMode | None = None,
    radius: float | None = None,
    tolerance: float | None = None,
) -> Call[JobCreated]:
    """``images``: a .zip/.tar(.gz) of images or an .npz, as a path or bytes (then give ``filename``)."""
    if isinstance(images, bytes | bytearray):
        name, data = filename or "images.zip", bytes(images)
    else:
        name, data = Path(images).name, Path(images).read_bytes()
    fields = _form(
        {"model": model, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "mode": mode, "radius": radius}
        | {"tolerance": tolerance}
    )
    files = {"file": (name, data, "application/octet-stream")}
    return Call("POST", "/v1/jobs", lambda r: JobCreated.model_validate(r.json()), data=fields, files=files)


def jobs(limit: int | None = None) -> Call[list[JobStatus]]:
    params = None if limit is None else {"limit": limit}
    return Call("GET", "/v1/jobs", lambda r: [JobStatus.model_validate(j) for j in r.json()["jobs"]], params=params)


def job(job_id: str) -> Call[JobStatus]:
    return Call("GET", f"/v1/jobs/{job_id}", lambda r: JobStatus.model_validate(r.json()))


def results(job_id: str, format: Literal["json", "tsv"] = "json") -> Call[JobResults] | Call[str]:
    """A job's rows so far: typed (``json``) or the paper's tab-separated log as text (``tsv``)."""
    path = f"/v1/jobs/{job_id}/results"
    if format == "tsv":
        return Call("GET", path, lambda r: r.text, params={"format": "tsv"})
    return Call("GET", path, lambda r: JobResults.model_validate(r.json()), params={"format": "json"})


def cancel(job_id: str) -> Call[JobStatus]:
    return Call("DELETE", f"/v1/jobs/{job_id}", lambda r: JobStatus.model_validate(r.json()))


def signing_key() -> Call[SigningKey]:
    return Call("GET", "/v1/signing-key", lambda r: SigningKey.model_validate(r.json()))


def job_id_of(job_or_id: str | JobCreated | JobStatus) -> str:
    return job_or_id if isinstance(job_or_id, str) else job_or_id.id
