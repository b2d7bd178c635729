"""Promotion objects into signed promotion records: the operator's decisions, as plain functions.

:func:`reconcile` takes a Promotion's spec, metadata and status plus the ledger, the policy and the
operator's key, and returns an :class:`Outcome` whose :meth:`Outcome.status` is the status patch. It
is tested without a cluster; :mod:`webhook.operator.kopf_app` only moves its result into ``status``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook import ledger
from webhook.core import dsse, keys, records, references
from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader
from webhook.core.policy import Policy
from webhook.core.records import RecordKind
from webhook.store import StoreError


class Phase(enum.StrEnum):
    RECORDED = "Recorded"
    REJECTED = "Rejected"
    PENDING = "Pending"


class SpecError(InvalidInput):
    """The Promotion's spec cannot become a record; the message names the field and the fix."""


_read = FieldReader(SpecError)


@dataclass(frozen=True)
class Outcome:
    """What the operator concluded for one generation of a Promotion; :meth:`status` is the patch."""

    phase: Phase
    reason: str
    generation: int | None
    record_id: str | None = None

    def status(self) -> dict[str, Any]:
        # recordId None removes a stale id (merge patch) when a later generation is rejected.
        return {"phase": str(self.phase), "reason": self.reason, "recordId": self.record_id,
                "observedGeneration": self.generation}


@dataclass(frozen=True)
class Submission:
    envelope: dsse.Envelope
    expect: dict[str, str]  # what the envelope must be about: a replayed envelope is refused
    reference: str
    environment: str


def promoted_by(meta: Mapping[str, Any]) -> str:
    return f"kubernetes:{meta.get('namespace', '')}/{meta.get('name', '')}"


def parse_image(value: Any) -> references.ImageReference:
    if not isinstance(value, str) or not value.strip():
        raise SpecError("spec.image is required: the image to promote, pinned by digest "
                        "(repository@sha256:<digest>)")
    try:
        ref = references.parse(value)
    except references.InvalidReference as exc:
        raise SpecError(f'spec.image "{value}" is not a valid image reference: {exc}') from exc
    if ref.digest is None:
        problem = "is a tag, not a digest" if ref.tag else "has no digest"
        raise SpecError(f'spec.image "{value}" {problem}; a promotion is about one immutable build: use '
                        f"{ref.written_name}@sha256:<digest>")
    return ref


def _environment(value: Any, policy: Policy) -> str:
    if not isinstance(value, str) or not value:
        defined = ", ".join(policy.environment_names) or "none"
        raise SpecError(f"spec.environment is required: the environment to promote to (defined: {defined})")
    return value


def _text(source: Mapping[str, Any], key: str, where: str) -> str:
    return _read.text(source.get(key), f"{where}.{key}")


def _count(source: Mapping[str, Any], key: str, where: str) -> int:
    return _read.count(source.get(key), f"{where}.{key}")


def _reason(evidence_reason: str, meta: Mapping[str, Any]) -> str:
    # The uid ties the record to the object, and through it to the API server's audit log, which
    # names the user who created it. With the generation it also makes the payload deterministic.
    suffix = (f"(Promotion {meta.get('namespace', '')}/{meta.get('name', '')} uid {meta.get('uid', '')} "
              f"generation {meta.get('generation', '')})")
    if not evidence_reason:
        return suffix
    room = records.MAX_TEXT - len(suffix) - 1
    text = evidence_reason if len(evidence_reason) <= room else evidence_reason[: room - 1] + "…"
    return f"{text} {suffix}"


def build_record(spec: Mapping[str, Any], meta: Mapping[str, Any], policy: Policy) -> records.Record:
    """The record the operator signs for a Promotion without an envelope.

    Deterministic per object generation: promotedAt is the object's creationTimestamp and the reason
    names its uid and generation, so signing again after a restart yields the same payload, which the
    store recognises as a duplicate.
    """
    ref = parse_image(spec.get("image"))
    environment = _environment(spec.get("environment"), policy)
    evidence = _read.mapping(spec.get("evidence"), "spec.evidence")
    tests = None
    given = [k for k in ("testsPassed", "testsFailed") if evidence.get(k) is not None]
    if len(given) == 1:
        raise SpecError(f"spec.evidence: give both testsPassed and testsFailed, not only {given[0]}")
    if given:
        tests = records.Tests(_count(evidence, "testsPassed", "spec.evidence"),
                              _count(evidence, "testsFailed", "spec.evidence"))
    scan = None
    if evidence.get("scan") is not None:
        raw_scan = _read.mapping(evidence["scan"], "spec.evidence.scan")
        scan = records.Scan(_text(raw_scan, "scanner", "spec.evidence.scan"),
                            {s: _count(raw_scan, s, "spec.evidence.scan") for s in records.SEVERITIES
                             if raw_scan.get(s) is not None})
    approvers = _read.strings(evidence.get("approvers") or None, "spec.evidence.approvers")
    created = meta.get("creationTimestamp")
    if not isinstance(created, str) or not created:
        raise SpecError("metadata.creationTimestamp is missing: the operator only records stored objects")
    previous = policy.previous_environment(environment)
    assert ref.digest is not None
    return records.Record(
        kind=RecordKind.PROMOTION, repository=ref.repository, digest=ref.digest, environment=environment,
        promoted_from=previous.name if previous else None, at=created, by=promoted_by(meta),
        source=records.Source(_text(evidence, "gitCommit", "spec.evidence"),
                              _text(evidence, "gitRepository", "spec.evidence"),
                              _text(evidence, "ciRunId", "spec.evidence"),
                              _text(evidence, "ciRunUrl", "spec.evidence")),
        tests=tests, scan=scan, approvers=approvers,
        reason=_reason(_text(evidence, "reason", "spec.evidence"), meta))


def _given_envelope(raw: Any) -> dsse.Envelope:
    if not isinstance(raw, str):
        raise SpecError("spec.envelope must be a string holding the DSSE envelope JSON")
    try:
        signed = records.open_envelope(raw)
    except records.MalformedEnvelope as exc:
        raise SpecError(f"spec.envelope: {exc}") from exc
    envelope, record = signed.envelope, signed.record
    if record.kind is not RecordKind.PROMOTION:
        raise SpecError("spec.envelope holds a revocation record; a Promotion carries a promotion record "
                        "(revoke with 'promotion-gate revoke')")
    return envelope


def submission(spec: Mapping[str, Any], meta: Mapping[str, Any], policy: Policy,
               signer: keys.SigningKey | None) -> Submission:
    """What to submit for this Promotion: its pre-signed envelope, or a record signed by the operator."""
    ref = parse_image(spec.get("image"))
    environment = _environment(spec.get("environment"), policy)
    if spec.get("envelope"):
        envelope = _given_envelope(spec["envelope"])
    elif signer is None:
        raise SpecError("spec.envelope is required: this operator has no signing key (--key), so it only "
                        "stores pre-signed envelopes")
    else:
        envelope = dsse.sign(records.payload(build_record(spec, meta, policy)), [signer])
    # The store refuses an envelope about anything else than the object says (a replayed envelope).
    assert ref.digest is not None
    expect = {"repository": ref.repository, "digest": ref.digest, "environment": environment}
    return Submission(envelope, expect, f"{ref.repository}@{ref.digest}", environment)


def already_recorded(meta: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return (status.get("phase") == Phase.RECORDED and bool(status.get("recordId"))
            and status.get("observedGeneration") == meta.get("generation"))


def reconcile(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any], *,
              records_ledger: ledger.Ledger, signer: keys.SigningKey | None) -> Outcome | None:
    """Record one Promotion; None when its status already says Recorded for this generation."""
    generation = meta.get("generation")
    generation = generation if isinstance(generation, int) else None
    if already_recorded(meta, status):
        return None
    try:
        planned = submission(spec, meta, records_ledger.policy, signer)
    except SpecError as exc:
        return Outcome(Phase.REJECTED, str(exc), generation)
    try:
        # Kubernetes RBAC on Promotion objects already decided who may write: every environment.
        outcome = records_ledger.submit(planned.envelope.to_json(), promoted_by(meta), lambda _environment: True,
                                        planned.expect)
    except StoreError as exc:
        return Outcome(Phase.PENDING, f"store unavailable, will retry: {exc}", generation)
    match outcome:
        case ledger.Stored():
            return Outcome(Phase.RECORDED, f'{planned.reference} recorded for environment "{planned.environment}"',
                           generation, outcome.id)
        case ledger.Duplicate(record_id):
            return Outcome(Phase.RECORDED, f'{planned.reference} was already recorded for environment '
                                           f'"{planned.environment}"', generation, record_id)
        case ledger.Refused(_, message) | ledger.Forbidden(message) | ledger.Malformed(message):
            return Outcome(Phase.REJECTED, message, generation)
