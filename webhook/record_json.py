"""The JSON shapes of records, statuses and traces: one definition for the API and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from webhook import ledger
from webhook.core import records
from webhook.core.promotion import PromotionStatus, StoredRecord, TagPromotion
from webhook.ledger import Trace
from webhook.store.sql import MAX_EVENT_READ_CHARS, MAX_LOCAL_EVENT_CHARS, AuditHit, AuditPage


def signer_json(signer: ledger.Signer) -> dict[str, Any]:
    return {"keyId": signer.key_id, "name": signer.name or None, "verified": signer.verified}


def stored_json(stored: StoredRecord, *, with_envelope: bool = True,
                signers: tuple[ledger.Signer, ...] | None = None) -> dict[str, Any]:
    """A stored record. ``signers`` (the policy's names for the keys that verify) become ``signedBy``;
    ``signers`` stays the key ids as written in the envelope."""
    data: dict[str, Any] = {"id": stored.id, "seq": stored.seq, "storedAt": stored.stored_at,
                            "submittedBy": stored.submitted_by, **records.record_json(stored.record),
                            "signers": [s.keyid for s in stored.envelope.signatures]}
    if signers is not None:
        data["signedBy"] = [signer_json(s) for s in signers]
    if with_envelope:
        data["envelope"] = stored.envelope.to_json()
    return data


def status_json(repository: str, digest: str, states: Mapping[str, PromotionStatus]) -> dict[str, Any]:
    """``GET /status`` and ``check``: the promotion state of one pinned image in every environment."""
    return {"repository": repository, "digest": digest, "states": {
        env: {"state": s.state.value, "records": list(s.record_ids), "promotedTo": list(s.promoted_to),
              "detail": s.detail, "revokedFrom": s.revoked_from} for env, s in states.items()}}


def tag_promotion_json(repository: str, tag: str, answer: TagPromotion) -> dict[str, Any]:
    """``GET /promoted``: the digest promoted to an environment for one tag, and every digest built as it."""
    return {"image": f"{repository}:{tag}", "repository": repository, "tag": tag, "digest": answer.digest or None,
            "reference": f"{repository}@{answer.digest}" if answer.digest else None, "builtAs": list(answer.built)}


def tag_promotion_of(data: Mapping[str, Any]) -> TagPromotion:
    """The inverse of :func:`tag_promotion_json`, for clients of the API."""
    digest = data.get("digest")
    built = data.get("builtAs") or []
    return TagPromotion(digest=digest if isinstance(digest, str) else "",
                        built=tuple(b for b in built if isinstance(b, str)) if isinstance(built, list) else ())


def omitted_event(hit: AuditHit, limit: int, hint: str) -> dict[str, Any]:
    """An event too large to be read in full here: its indexed columns (not re-checked), and why."""
    c = hit.columns
    return {"seq": hit.seq, "time": c.time, "uid": c.uid, "namespace": c.namespace, "user": c.username,
            "allowed": c.allowed, "reasons": c.reasons.split(",") if c.reasons else [],
            "omitted": f"event of {hit.size} characters is larger than the read limit of {limit}; {hint}"}


def event_json(hit: AuditHit) -> dict[str, Any]:
    """An event read from a local store (``--store``): parsed, unless it is larger than any server writes."""
    if hit.text is None:
        return omitted_event(hit, MAX_LOCAL_EVENT_CHARS, "no server writes such events: run 'promotion-gate audit "
                                                         "verify'")
    parsed: dict[str, Any] = orjson.loads(hit.text)
    return parsed


def event_bytes(hit: AuditHit) -> bytes:
    """An event as the API sends it: the stored text as it was hashed (never re-serialised), or the omitted form."""
    if hit.text is not None:
        return hit.text.encode()
    return orjson.dumps(omitted_event(hit, MAX_EVENT_READ_CHARS, "read it with 'promotion-gate audit --store …'"))


def _trace_head(trace: Trace) -> dict[str, Any]:
    return {
        "digest": trace.digest,
        "records": [stored_json(s, with_envelope=False, signers=trace.signers.get(s.id)) for s in trace.promotions],
        "revocations": [stored_json(s, with_envelope=False, signers=trace.signers.get(s.id))
                        for s in trace.revocations],
        "states": {repository: {env: {"state": s.state.value, "records": list(s.record_ids), "detail": s.detail,
                                      "revokedFrom": s.revoked_from}
                                for env, s in states.items()}
                   for repository, states in trace.states.items()},
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    data = _trace_head(trace)
    data["admissions"] = [event_json(hit) for hit in trace.admissions.events]
    if trace.admissions.next is not None:
        data["admissionsNext"] = trace.admissions.next
    return data


def _events_chunks(key: str, page: AuditPage, next_key: str) -> Iterator[bytes]:
    yield f'"{key}":['.encode()
    for index, hit in enumerate(page.events):
        yield b"," + event_bytes(hit) if index else event_bytes(hit)
    yield b"]"
    if page.next is not None:
        yield f',"{next_key}":{page.next}'.encode()


def trace_chunks(trace: Trace) -> list[bytes]:
    """``GET /trace`` as chunks of one JSON document: the stored event texts are sent as they are."""
    # json, not orjson: a record stored with a lone surrogate in its text is escaped, never a failure
    head = json.dumps(_trace_head(trace), separators=(",", ":")).encode()
    return [head[:-1] + b",", *_events_chunks("admissions", trace.admissions, "admissionsNext"), b"}"]


def audit_chunks(page: AuditPage) -> list[bytes]:
    """``GET /audit`` as chunks of one JSON document."""
    return [b"{", *_events_chunks("events", page, "next"), b"}"]


def outcome_json(outcome: ledger.SubmitOutcome) -> tuple[int, dict[str, Any]]:
    """A submission's outcome as the API answers it: the HTTP status and the JSON body."""
    match outcome:
        case ledger.Stored():
            return 201, {"id": outcome.id, "seq": outcome.seq, "kind": str(outcome.kind),
                         "repository": outcome.repository, "digest": outcome.digest,
                         "environment": outcome.environment}
        case ledger.Duplicate(record_id, message):
            return 409, {"error": message, "id": record_id}
        case ledger.Refused(rule, message):
            return 422, {"error": message, "rule": rule}
        case ledger.Forbidden(message):
            return 403, {"error": message}
        case ledger.Malformed(message):
            return 400, {"error": message}
