"""Promotion and revocation records: in-toto Statements (v1) carried in DSSE envelopes.

A record's subject is the normalised repository plus the digest; its predicate says which
environment the digest was promoted to, from where, by whom, and with what evidence (the chain of
custody). The schema is documented in docs/records.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from webhook import dsse, references

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PROMOTION_PREDICATE = "https://promotion-gate.io/promotion/v1"
REVOCATION_PREDICATE = "https://promotion-gate.io/revocation/v1"
SEVERITIES = ("critical", "high", "medium", "low")
MAX_TEXT = 4096


class RecordError(ValueError):
    """The statement inside an envelope is not a well-formed record."""


@dataclass(frozen=True)
class Source:
    git_commit: str = ""
    git_repository: str = ""
    ci_run_id: str = ""
    ci_run_url: str = ""


@dataclass(frozen=True)
class Tests:
    passed: int
    failed: int


@dataclass(frozen=True)
class Scan:
    scanner: str
    findings: Mapping[str, int]


@dataclass(frozen=True)
class Record:
    """A parsed record: what was promoted (or revoked) where, and the custody evidence."""

    kind: str  # 'promotion' | 'revocation'
    repository: str
    digest: str
    environment: str
    promoted_from: str | None
    at: str
    by: str
    source: Source = field(default_factory=Source)
    tests: Tests | None = None
    scan: Scan | None = None
    approvers: tuple[str, ...] = ()
    reason: str = ""

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def record_id(envelope: dsse.Envelope) -> str:
    """Content address of a record: the SHA-256 of its signed payload."""
    return hashlib.sha256(envelope.payload).hexdigest()


def statement(record: Record) -> dict[str, Any]:
    algorithm, _, encoded = record.digest.partition(":")
    predicate: dict[str, Any] = {"environment": record.environment}
    if record.kind == "promotion":
        if record.promoted_from:
            predicate["promotedFrom"] = record.promoted_from
        predicate["promotedAt"] = record.at
        predicate["promotedBy"] = record.by
        source = {k: v for k, v in {
            "gitCommit": record.source.git_commit, "repository": record.source.git_repository,
            "ciRunId": record.source.ci_run_id, "ciRunUrl": record.source.ci_run_url}.items() if v}
        if source:
            predicate["source"] = source
        if record.tests is not None:
            predicate["tests"] = {"passed": record.tests.passed, "failed": record.tests.failed}
        if record.scan is not None:
            predicate["scan"] = {"scanner": record.scan.scanner, "findings": dict(record.scan.findings)}
        predicate["approvers"] = list(record.approvers)
    else:
        predicate["revokedAt"] = record.at
        predicate["revokedBy"] = record.by
    if record.reason:
        predicate["reason"] = record.reason
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": record.repository, "digest": {algorithm: encoded}}],
        "predicateType": PROMOTION_PREDICATE if record.kind == "promotion" else REVOCATION_PREDICATE,
        "predicate": predicate,
    }


def payload(record: Record) -> bytes:
    return json.dumps(statement(record), separators=(",", ":"), sort_keys=True).encode()


def _text(value: Any, where: str, *, required: bool = False) -> str:
    if value is None:
        if required:
            raise RecordError(f"{where} is required")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a string")
    if len(value) > MAX_TEXT:
        raise RecordError(f"{where} is longer than {MAX_TEXT} characters")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordError(f"{where} must be a non-negative integer")
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecordError(f"{where} must be an object")
    return value


def parse_statement(raw: bytes) -> Record:
    """Parse and validate a statement payload; the message names the bad field."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordError("payload is not a JSON in-toto Statement") from exc
    doc = _obj(doc, "statement")
    if doc.get("_type") != STATEMENT_TYPE:
        raise RecordError(f"statement _type must be {STATEMENT_TYPE!r}")
    predicate_type = doc.get("predicateType")
    if predicate_type == PROMOTION_PREDICATE:
        kind = "promotion"
    elif predicate_type == REVOCATION_PREDICATE:
        kind = "revocation"
    else:
        raise RecordError(f"predicateType must be {PROMOTION_PREDICATE!r} or {REVOCATION_PREDICATE!r}")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise RecordError("statement must have exactly one subject (one image digest per record)")
    subject = _obj(subjects[0], "subject[0]")
    name = _text(subject.get("name"), "subject[0].name", required=True)
    try:
        ref = references.parse(name)
    except references.InvalidReference as exc:
        raise RecordError(f"subject[0].name: {exc}") from exc
    if ref.tag or ref.digest or ref.repository != name:
        raise RecordError(f"subject[0].name must be a normalised repository such as {ref.repository!r}")
    digests = _obj(subject.get("digest"), "subject[0].digest")
    if len(digests) != 1:
        raise RecordError("subject[0].digest must hold exactly one digest")
    ((algorithm, encoded),) = digests.items()
    digest = f"{algorithm}:{encoded}"
    if not isinstance(encoded, str) or not references.is_digest(digest):
        raise RecordError("subject[0].digest must be sha256 (64 lowercase hex) or sha512 (128)")
    pred = _obj(doc.get("predicate"), "predicate")
    environment = _text(pred.get("environment"), "predicate.environment", required=True)
    reason = _text(pred.get("reason"), "predicate.reason")
    if kind == "revocation":
        return Record("revocation", name, digest, environment, None,
                      _text(pred.get("revokedAt"), "predicate.revokedAt", required=True),
                      _text(pred.get("revokedBy"), "predicate.revokedBy", required=True), reason=reason)
    source = Source()
    if "source" in pred:
        s = _obj(pred["source"], "predicate.source")
        source = Source(_text(s.get("gitCommit"), "predicate.source.gitCommit"),
                        _text(s.get("repository"), "predicate.source.repository"),
                        _text(s.get("ciRunId"), "predicate.source.ciRunId"),
                        _text(s.get("ciRunUrl"), "predicate.source.ciRunUrl"))
    tests = None
    if "tests" in pred:
        t = _obj(pred["tests"], "predicate.tests")
        tests = Tests(_count(t.get("passed"), "predicate.tests.passed"),
                      _count(t.get("failed"), "predicate.tests.failed"))
    scan = None
    if "scan" in pred:
        s = _obj(pred["scan"], "predicate.scan")
        findings = _obj(s.get("findings", {}), "predicate.scan.findings")
        unknown = set(findings) - set(SEVERITIES)
        if unknown:
            raise RecordError(f"predicate.scan.findings: unknown severity {sorted(unknown)[0]!r}")
        scan = Scan(_text(s.get("scanner"), "predicate.scan.scanner"),
                    {k: _count(v, f"predicate.scan.findings.{k}") for k, v in findings.items()})
    approvers = pred.get("approvers", [])
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise RecordError("predicate.approvers must be a list of strings")
    promoted_from = pred.get("promotedFrom")
    return Record(
        "promotion", name, digest, environment,
        _text(promoted_from, "predicate.promotedFrom") or None,
        _text(pred.get("promotedAt"), "predicate.promotedAt", required=True),
        _text(pred.get("promotedBy"), "predicate.promotedBy", required=True),
        source, tests, scan, tuple(approvers), reason,
    )


def record_json(record: Record) -> dict[str, Any]:
    """The record as people and tools read it (the statement's predicate, flattened)."""
    data: dict[str, Any] = {
        "kind": record.kind, "repository": record.repository, "digest": record.digest,
        "environment": record.environment, "at": record.at, "by": record.by,
    }
    if record.kind == "promotion":
        data["promotedFrom"] = record.promoted_from
        data["source"] = {"gitCommit": record.source.git_commit, "repository": record.source.git_repository,
                          "ciRunId": record.source.ci_run_id, "ciRunUrl": record.source.ci_run_url}
        data["tests"] = None if record.tests is None else {"passed": record.tests.passed,
                                                            "failed": record.tests.failed}
        data["scan"] = None if record.scan is None else {"scanner": record.scan.scanner,
                                                          "findings": dict(record.scan.findings)}
        data["approvers"] = list(record.approvers)
    data["reason"] = record.reason
    return data
