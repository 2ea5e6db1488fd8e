"""``AsyncClient``: ``Client``'s methods as coroutines (the same requests, awaited instead of blocking)."""

from __future__ import annotations

import asyncio
import os
import time
from types import TracebackType
from typing import Literal, Self, TypeVar, overload

import httpx

from certserve_client import calls
from certserve_client.calls import Call, CertifyMode, ImageLike, Priority, RetryPolicy, job_id_of
from certserve_client.client import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    JobProgress,
    JobRef,
    _args,
    _headers,
    _signed,
    _unavailable,
    _verified,
)
from certserve_client.models import Certificate, JobCreated, JobResults, JobStatus, ModelInfo, Prediction, SigningKey

T = TypeVar("T")


class AsyncClient:
    """``Client``'s methods as coroutines, on one ``httpx.AsyncClient`` (use ``async with``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport
        )
        self._signing_key: SigningKey | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        """As ``Client.send``, awaiting instead of blocking."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.request_kwargs())
            except httpx.ConnectError as error:
                wait = self.retry.delay(attempt, None)
                if wait is None:
                    raise _unavailable(error, self.url) from error
            except httpx.TransportError as error:
                raise _unavailable(error, self.url) from error
            else:
                wait = self.retry.delay(attempt, response) if calls.should_retry(response) else None
                if wait is None:
                    return call.read(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def predict(
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
        return await self.send(calls.predict(**_args(locals())))

    async def certify(
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
        certificate = await self.send(calls.certify(**_args(locals(), "verify")))
        return _verified(_signed(certificate), await self.signing_key()) if verify else certificate

    async def models(self) -> list[ModelInfo]:
        return await self.send(calls.models())

    async def model(self, model_id: str) -> ModelInfo:
        return await self.send(calls.model(model_id))

    async def submit_job(
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
        return await self.send(calls.submit_job(**_args(locals())))

    async def jobs(self, limit: int | None = None) -> list[JobStatus]:
        return await self.send(calls.jobs(limit))

    async def job(self, job: JobRef) -> JobStatus:
        return await self.send(calls.job(job_id_of(job)))

    async def wait(
        self, job: JobRef, *, progress: bool = False, poll_s: float = 0.5, timeout: float | None = None
    ) -> JobStatus:
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = JobProgress(progress, job_id)
        try:
            while True:
                status = await self.job(job_id)
                bar.update(status)
                if status.finished:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {status.state} ({status.done}/{status.total})")
                await asyncio.sleep(poll_s)
        finally:
            bar.close()

    @overload
    async def results(self, job: JobRef, format: Literal["json"] = "json") -> JobResults: ...
    @overload
    async def results(self, job: JobRef, format: Literal["tsv"]) -> str: ...
    async def results(self, job: JobRef, format: Literal["json", "tsv"] = "json") -> JobResults | str:
        return await self.send(calls.results(job_id_of(job), format))

    async def cancel(self, job: JobRef) -> JobStatus:
        return await self.send(calls.cancel(job_id_of(job)))

    async def signing_key(self) -> SigningKey:
        if self._signing_key is None:
            self._signing_key = await self.send(calls.signing_key())
        return self._signing_key
