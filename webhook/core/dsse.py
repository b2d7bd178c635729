"""DSSE envelopes (Dead Simple Signing Envelope, v1) with PAE, as the DSSE spec defines them.

Written by hand because it is a dozen lines of the spec and the product's trust boundary; the tests
check our envelopes against an independent implementation (securesystemslib).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core import keys
from webhook.core.errors import InvalidInput

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 256 * 1024
MAX_SIGNATURES = 16


class EnvelopeError(InvalidInput):
    """The envelope is malformed (not a signature problem)."""


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: ``DSSEv1 SP LEN(type) SP type SP LEN(body) SP body``."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign(payload: bytes, signers: Iterable[keys.SigningKey], payload_type: str = IN_TOTO_PAYLOAD_TYPE) -> Envelope:
    message = pae(payload_type, payload)
    signatures = tuple(Signature(k.key_id, k.sign(message)) for k in signers)
    if not signatures:
        raise EnvelopeError("at least one signing key is required")
    return Envelope(payload_type, payload, signatures)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:  # DSSE allows URL-safe base64 too
            return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EnvelopeError(f"{where} is not valid base64") from exc


def parse(document: Any) -> Envelope:
    if isinstance(document, str | bytes):
        raw = document.encode() if isinstance(document, str) else document
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise EnvelopeError(f"envelope is larger than {MAX_ENVELOPE_BYTES} bytes")
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise EnvelopeError("envelope is not valid JSON") from exc
    if not isinstance(document, Mapping):
        raise EnvelopeError("envelope must be a JSON object with payloadType, payload and signatures")
    payload_type = document.get("payloadType")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise EnvelopeError(f"envelope payloadType must be {IN_TOTO_PAYLOAD_TYPE!r}, got {payload_type!r}")
    payload = _b64(document.get("payload"), "envelope payload")
    raw_signatures = document.get("signatures")
    if not isinstance(raw_signatures, list) or not raw_signatures:
        raise EnvelopeError("envelope signatures must be a non-empty list")
    if len(raw_signatures) > MAX_SIGNATURES:
        raise EnvelopeError(f"envelope has more than {MAX_SIGNATURES} signatures")
    signatures = []
    for index, item in enumerate(raw_signatures):
        if not isinstance(item, Mapping):
            raise EnvelopeError(f"envelope signatures[{index}] must be an object")
        keyid = item.get("keyid", "")
        if not isinstance(keyid, str):
            raise EnvelopeError(f"envelope signatures[{index}].keyid must be a string")
        signatures.append(Signature(keyid, _b64(item.get("sig"), f"envelope signatures[{index}].sig")))
    return Envelope(payload_type, payload, tuple(signatures))


def verified_key_ids(envelope: Envelope, trusted: Iterable[keys.VerifyingKey]) -> frozenset[str]:
    """Key ids of the trusted keys that produced a valid signature over this envelope.

    Each signature is tried against the key its keyid names and, when the keyid is empty or unknown,
    against every trusted key (the keyid is only a hint in DSSE). A key counts once however many
    signatures it made, so one key can never satisfy a two-approval rule.
    """
    message = pae(envelope.payload_type, envelope.payload)
    table = {k.key_id: k for k in trusted}
    verified: set[str] = set()
    for signature in envelope.signatures:
        candidates = [table[signature.keyid]] if signature.keyid in table else list(table.values())
        for key in candidates:
            if key.key_id not in verified and key.verify(signature.sig, message):
                verified.add(key.key_id)
                break
    return frozenset(verified)
