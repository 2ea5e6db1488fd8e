"""Exceptions of the client: one class per kind of failure, each carrying the server's own message.

The server answers every error as ``{"detail": "..."}`` (``{"error": "..."}`` on /v2); that text
is the exception's message and its ``detail``.
"""

from __future__ import annotations

import httpx


class CertserveError(Exception):
    """Base class: ``status_code`` is None when no HTTP answer came (connection refused, client timeout)."""

    def __init__(self, detail: str, status_code: int | None = None, headers: httpx.Headers | None = None) -> None:
        super().__init__(detail if status_code is None else f"{status_code}: {detail}")
        self.detail = detail
        self.status_code = status_code
        self.headers = headers or httpx.Headers()


class RequestRejected(CertserveError):
    """The server refused the request (a 4xx): asking again unchanged gives the same answer."""


class AuthenticationRequired(RequestRejected):
    """401: the service has API keys and none was sent."""


class InvalidApiKey(RequestRejected):
    """403: the API key is not one of the service's."""


class NotFound(RequestRejected):
    """404: unknown model, job (or a job another key created)."""


class PayloadTooLarge(RequestRejected):
    """413: the body or the decoded image is above the service's limit."""


class UnsupportedInput(RequestRejected):
    """415: unsupported content type, or an image that does not decode."""


class InvalidRequest(RequestRejected):
    """422: invalid parameters or input (shape, range, NaN, ...)."""


class ServerUnavailable(CertserveError):
    """The server could not answer now: connection failed, a 5xx, or it timed out; a later try may work."""


class ServerBusy(ServerUnavailable):
    """503: too much work queued (still so after the client's retries). ``retry_after_s`` is the server's hint."""

    @property
    def retry_after_s(self) -> float | None:
        return retry_after(self.headers)


class DeadlineExceeded(ServerUnavailable):
    """504: the request's deadline passed on the server; its remaining work was dropped."""


class SignatureError(CertserveError):
    """A certificate's signature is missing or does not verify with the server's public key."""


BY_STATUS: dict[int, type[CertserveError]] = {
    401: AuthenticationRequired,
    403: InvalidApiKey,
    404: NotFound,
    413: PayloadTooLarge,
    415: UnsupportedInput,
    422: InvalidRequest,
    503: ServerBusy,
    504: DeadlineExceeded,
}


def retry_after(headers: httpx.Headers) -> float | None:
    """The Retry-After header in seconds (its delay-seconds form), or None."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from(response: httpx.Response) -> CertserveError:
    """The exception for an error answer, with the server's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = (body.get("detail") or body.get("error")) if isinstance(body, dict) else None
    text = str(detail) if detail else (response.text.strip() or response.reason_phrase)
    status = response.status_code
    default = RequestRejected if 400 <= status < 500 else ServerUnavailable
    return BY_STATUS.get(status, default)(text, status, response.headers)
