"""Checking a certificate's Ed25519 signature with the server's public key (needs ``cryptography``).

The signature covers ``canonical_payload(answer)``: canonical JSON (sorted keys, no spaces,
ASCII) of ``{"scheme": SIGNATURE_SCHEME, "certificate": <the signed fields>}``, exactly as the
server's ``service/signing.py`` builds it (a test holds the two to the same bytes). Fields
outside SIGNED_FIELDS (cached, queued_s, compute_s, class_name, ...) may differ between
deliveries of one certificate and are not covered.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

SIGNATURE_SCHEME = "ed25519/certserve-v1"
SIGNED_FIELDS = (
    "model",
    "manifest_digest",
    "precision",
    "procedure",
    "sigma",
    "n0",
    "n",
    "n_max",
    "alpha",
    "mode",
    "input_digest",
    "label",
    "radius",
    "p_a_lower",
    "top_class",
    "selection_counts",
    "estimation_counts",
    "samples",
    "seed",
    "seed_source",
    "signed_at",
)
DECISION_FIELDS = ("target_radius", "certified_at_radius")  # signed in an adaptive radius decision


def canonical_payload(answer: dict[str, Any]) -> bytes:
    """The bytes a signature covers; KeyError if a signed field is missing."""
    fields = {name: answer[name] for name in SIGNED_FIELDS}
    if answer.get("mode") == "adaptive" and answer.get("target_radius") is not None:
        fields |= {name: answer[name] for name in DECISION_FIELDS}
    document = {"scheme": SIGNATURE_SCHEME, "certificate": fields}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify_answer(answer: dict[str, Any], public_key_pem: bytes | str) -> bool:
    """True iff ``answer["signature"]`` signs the answer's signed fields under the Ed25519 key ``public_key_pem``.

    False for a missing or malformed signature or a missing field; ValueError for a key that is not Ed25519.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the server's signing key is not an Ed25519 public key")
    try:
        key.verify(base64.b64decode(answer["signature"], validate=True), canonical_payload(answer))
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature):
        return False
    return True
