"""``Client``, the blocking client of the certserve HTTP API (``AsyncClient``: certserve_client.async_client).

Both send the same ``calls.Call`` requests; they differ only in how they wait. Every method
raises a ``certserve_client.errors`` exception carrying the server's message on failure.

    from certserve_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        certificate = client.certify("digit.png", n=10_000)
        print(certificate.label, certificate.radius)
"""

from __future__ import annotations

import os
import time
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx
from tqdm import tqdm

from certserve_client import calls
from certserve_client.calls import Call, CertifyMode, ImageLike, Priority, RetryPolicy, job_id_of
from certserve_client.errors import ServerUnavailable, SignatureError
from certserve_client.models import Certificate, JobCreated, JobResults, JobStatus, ModelInfo, Prediction, SigningKey

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 330.0  # the server's default deadline (300 s) plus the time to answer
JobRef = str | JobCreated | JobStatus


class JobProgress:
    """A tqdm bar over a job's images (done of total, abstentions alongside); a no-op when disabled."""

    def __init__(self, enabled: bool, job_id: str) -> None:
        self.bar: tqdm | None = tqdm(desc=f"job {job_id[:8]}", unit="image", dynamic_ncols=True) if enabled else None

    def update(self, status: JobStatus) -> None:
        if self.bar is None:
            return
        if self.bar.total != status.total:
            self.bar.total = status.total
        self.bar.set_postfix(abstained=status.abstentions, state=status.state, refresh=False)
        self.bar.update(status.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _unavailable(error: httpx.TransportError, url: str) -> ServerUnavailable:
    if isinstance(error, httpx.TimeoutException):
        return ServerUnavailable(f"no answer from {url} within the client's timeout ({type(error).__name__})")
    return ServerUnavailable(f"cannot reach {url}: {error or type(error).__name__}")


def _signed(certificate: Certificate) -> Certificate:
    if certificate.signature is None:
        raise SignatureError("the certificate carries no signature (the server has no signing key)")
    return certificate


def _verified(certificate: Certificate, key: SigningKey) -> Certificate:
    if not certificate.verify(key.public_key_pem):
        raise SignatureError(f"the certificate's signature does not verify with the server's key {key.key_id}")
    return certificate


class Client:
    """A blocking client. ``retry`` governs resending after a 503 or a refused connection.

    ``timeout`` is the client's own limit (seconds) per HTTP request; the server's deadline is
    ``CERTSERVE_REQUEST_TIMEOUT_S`` (shorten it per request with ``timeout_s``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)
        self._signing_key: SigningKey | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        """Send ``call``, retrying as ``self.retry`` allows; the parsed answer, or the error raised."""
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.request_kwargs())
            except httpx.ConnectError as error:  # nothing was sent: safe to resend, even a job upload
                wait = self.retry.delay(attempt, None)
                if wait is None:
                    raise _unavailable(error, self.url) from error
            except httpx.TransportError as error:
                raise _unavailable(error, self.url) from error
            else:
                wait = self.retry.delay(attempt, response) if calls.should_retry(response) else None
                if wait is None:
                    return call.read(response)
            time.sleep(wait)
            attempt += 1

    def predict(
        self,
        image: ImageLike,
        *,
        model: str | None = None,
        n: int | None = None,
        alpha: float | None = None,
        seed: int | None = None,
        resize: bool | None = None,
        priority: Priority | None = None,
        timeout_s: float | None = None,
    ) -> Prediction:
        """PREDICT on ``image`` (a path, encoded bytes, or pixel values in [0, 1]); None = server default."""
        return self.send(calls.predict(**_args(locals())))

    def certify(
        self,
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
        verify: bool = False,
    ) -> Certificate:
        """CERTIFY: ``mode`` fixed (n estimation samples) or adaptive (at most n); ``radius`` asks for a decision
        at that radius (``certified_at_radius``). ``verify`` checks the server's signature (SignatureError)."""
        certificate = self.send(calls.certify(**_args(locals(), "verify")))
        return _verified(_signed(certificate), self.signing_key()) if verify else certificate

    def models(self) -> list[ModelInfo]:
        return self.send(calls.models())

    def model(self, model_id: str) -> ModelInfo:
        return self.send(calls.model(model_id))

    def submit_job(
        self,
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
    ) -> JobCreated:
        """Start certifying every image of a .zip/.tar(.gz) of images or an .npz (path, or bytes + ``filename``),
        each as ``certify`` would with the same parameters."""
        return self.send(calls.submit_job(**_args(locals())))

    def jobs(self, limit: int | None = None) -> list[JobStatus]:
        """The caller's recent jobs, newest first."""
        return self.send(calls.jobs(limit))

    def job(self, job: JobRef) -> JobStatus:
        return self.send(calls.job(job_id_of(job)))

    def wait(
        self, job: JobRef, *, progress: bool = False, poll_s: float = 0.5, timeout: float | None = None
    ) -> JobStatus:
        """Poll until the job is done, cancelled or failed; its last status. ``progress``: a tqdm bar on stderr.

        Raises TimeoutError after ``timeout`` seconds (None: wait as long as it takes)."""
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = JobProgress(progress, job_id)
        try:
            while True:
                status = self.job(job_id)
                bar.update(status)
                if status.finished:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {status.state} ({status.done}/{status.total})")
                time.sleep(poll_s)
        finally:
            bar.close()

    @overload
    def results(self, job: JobRef, format: Literal["json"] = "json") -> JobResults: ...
    @overload
    def results(self, job: JobRef, format: Literal["tsv"]) -> str: ...
    def results(self, job: JobRef, format: Literal["json", "tsv"] = "json") -> JobResults | str:
        """The job's rows so far: typed, or the paper's TSV log (``idx label predict radius correct time``)."""
        return self.send(calls.results(job_id_of(job), format))

    def cancel(self, job: JobRef) -> JobStatus:
        """Cancel the job (finished images keep their rows); ``cancelled`` says whether this call stopped it."""
        return self.send(calls.cancel(job_id_of(job)))

    def signing_key(self) -> SigningKey:
        """The server's Ed25519 public key that certificate signatures verify with (fetched once; 404 if none)."""
        if self._signing_key is None:
            self._signing_key = self.send(calls.signing_key())
        return self._signing_key


def _args(scope: dict[str, Any], *drop: str) -> dict[str, Any]:
    """A method's arguments (its ``locals()``) to pass on to the ``calls`` function of the same name."""
    return {k: v for k, v in scope.items() if k not in ("self", *drop)}
