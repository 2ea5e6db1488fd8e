"""Checking a certificate's Ed25519 signature with the server's public key (needs ``cryptography``).

PROVISIONAL until the server's signing lands: the canonical encoding must be the server's.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from certserve_client.models import Certificate

UNSIGNED_FIELDS = ("signature", "cached", "queued_s", "compute_s")


def canonical_bytes(answer: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the answer without its signature and per-delivery fields, as sorted JSON."""
    signed = {k: v for k, v in answer.items() if k not in UNSIGNED_FIELDS}
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def verify_certificate(certificate: Certificate, public_key_pem: bytes) -> bool:
    """Whether ``certificate`` carries a signature that verifies with ``public_key_pem`` (Ed25519, PEM)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not certificate.signature:
        return False
    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(base64.b64decode(certificate.signature, validate=True), canonical_bytes(certificate.raw))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
