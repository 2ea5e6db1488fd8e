"""Optional API keys: with keys configured, every /v1 call needs ``Authorization: Bearer <key>``.

No header (or another scheme) → 401 with ``WWW-Authenticate: Bearer``; a key that is not
configured → 403. Keys are compared in constant time. The accepted key identifies the caller
to the job runner, which stores only a hash of it, so that a job is visible only to its creator.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.http.state import services

bearer = HTTPBearer(auto_error=False, description="API key (needed only when the service has keys configured)")


def key_matches(key: str, keys: list[str]) -> bool:
    """Whether ``key`` is one of ``keys``, comparing against every key in constant time."""
    matches = [hmac.compare_digest(key.encode(), known.encode()) for known in keys]  # no early exit
    return any(matches)


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str | None:
    """The caller's API key (None when the service has no keys); 401 without one, 403 for a wrong one."""
    keys = services(request).settings.api_keys
    if not keys:
        return None
    if credentials is None:
        raise HTTPException(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(credentials.credentials, keys):
        raise HTTPException(403, "invalid API key")
    return credentials.credentials


Caller = Annotated[str | None, Depends(require_key)]
"""A route parameter of this type receives the caller's API key (None without authentication)."""
