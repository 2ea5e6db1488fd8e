"""Python client of certserve: certified predictions by randomized smoothing over HTTP.

``Client`` / ``AsyncClient`` call the /v1 API and return typed answers (``models``); failures
raise the exceptions of ``errors``, carrying the server's message. ``certserve-client`` is the
command line on top (``certserve_client.cli``).
"""

from certserve_client.async_client import AsyncClient
from certserve_client.calls import RetryPolicy
from certserve_client.client import Client
from certserve_client.errors import (
    AuthenticationRequired,
    CertserveError,
    DeadlineExceeded,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestRejected,
    ServerBusy,
    ServerUnavailable,
    SignatureError,
    UnsupportedInput,
)
from certserve_client.models import (
    Certificate,
    JobCreated,
    JobResults,
    JobRow,
    JobStatus,
    ModelInfo,
    Prediction,
    SigningKey,
)

__all__ = [
    "AsyncClient",
    "AuthenticationRequired",
    "Certificate",
    "CertserveError",
    "Client",
    "DeadlineExceeded",
    "InvalidApiKey",
    "InvalidRequest",
    "JobCreated",
    "JobResults",
    "JobRow",
    "JobStatus",
    "ModelInfo",
    "NotFound",
    "PayloadTooLarge",
    "Prediction",
    "RequestRejected",
    "RetryPolicy",
    "ServerBusy",
    "ServerUnavailable",
    "SignatureError",
    "SigningKey",
    "UnsupportedInput",
]
