"""Signed certificates: proof that a certificate came from this service (Ed25519, ``cryptography``).

With ``CERTSERVE_SIGNING_KEY_FILE`` set (a PEM Ed25519 private key), every certify answer carries
``signature``: base64 of an Ed25519 signature over ``canonical_payload(answer)``, the canonical
JSON (sorted keys, no spaces, ASCII) of the fields in ``SIGNED_FIELDS`` (plus the decision's
``target_radius`` and ``certified_at_radius`` when the answer is a sequential radius decision,
where they are part of what was certified). ``GET /v1/signing-key`` serves the public key.

Verifying needs only the answer as JSON and the public key::

    from service.signing import verify
    verify(answer_dict, public_key_pem)  # True, or False for any changed signed field

This module imports no other part of the service, so a client can copy it whole.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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
DECISION_FIELDS = ("target_radius", "certified_at_radius")


class SigningKeyError(Exception):
    """The signing key file is missing, unreadable or not an Ed25519 private key."""


def canonical_payload(answer: dict[str, Any]) -> bytes:
    """The bytes a signature covers: canonical JSON of the signed fields of ``answer``.

    Raises KeyError if a signed field is missing.
    """
    fields = {name: answer[name] for name in SIGNED_FIELDS}
    if answer.get("mode") == "adaptive" and answer.get("target_radius") is not None:
        fields |= {name: answer[name] for name in DECISION_FIELDS}
    document = {"scheme": SIGNATURE_SCHEME, "certificate": fields}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (unencrypted); SigningKeyError otherwise."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SigningKeyError(f"cannot read the signing key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {path} is not an Ed25519 private key")
    return key


def sign(answer: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """Base64 Ed25519 signature of ``canonical_payload(answer)``."""
    return base64.b64encode(key.sign(canonical_payload(answer))).decode()


def verify(answer: dict[str, Any], public_key: bytes | str | Ed25519PublicKey) -> bool:
    """True iff ``answer['signature']`` is a valid signature of its signed fields under ``public_key``
    (an Ed25519PublicKey or its PEM). False for a missing or malformed signature or field."""
    if not isinstance(public_key, Ed25519PublicKey):
        pem = public_key.encode() if isinstance(public_key, str) else public_key
        loaded = serialization.load_pem_public_key(pem)
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        public_key = loaded
    try:
        signature = base64.b64decode(answer["signature"], validate=True)
        public_key.verify(signature, canonical_payload(answer))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False
    return True


def new_key(path: Path) -> Ed25519PublicKey:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key beside it (.pub.pem)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(pem)
    path.with_suffix(".pub.pem").write_text(public_key_pem(key.public_key()))
    return key.public_key()


def main(argv: list[str] | None = None) -> None:
    """``python -m service.signing new-key FILE``: make a signing key (refuses to overwrite one)."""
    parser = argparse.ArgumentParser(prog="python -m service.signing", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help="write a new Ed25519 key").add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        public = new_key(args.file)
    except FileExistsError:
        parser.error(f"{args.file} exists; not overwritten")
    print(f"wrote {args.file} (key id {key_id(public)}) and {args.file.with_suffix('.pub.pem')}")


if __name__ == "__main__":
    main()
