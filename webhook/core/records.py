"""Promotion and revocation records: in-toto Statements (v1) carried in DSSE envelopes.

A record's subject is the normalised repository plus the digest; its predicate says which
environment the digest was promoted to, from where, by whom, and with what evidence (the chain of
custody). The schema is documented in docs/records.md.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from webhook.core import dsse, references
from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PROMOTION_PREDICATE = "https://promotion-gate.io/promotion/v1"
REVOCATION_PREDICATE = "https://promotion-gate.io/revocation/v1"
SEVERITIES = ("critical", "high", "medium", "low")
MAX_TEXT = 4096
# The source fields an image's own labels can confirm (docs/records.md, "confirmedByImageLabels").
LABELLED_SOURCE_FIELDS = ("gitCommit", "ciRunId", "repository")


class RecordError(InvalidInput):
    """The statement inside an envelope is not a well-formed record."""


class MalformedEnvelope(InvalidInput):
    """An envelope or the statement it carries cannot be read (``malformed envelope: …``)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"malformed envelope: {problem}")
        self.problem = problem


class RecordKind(enum.StrEnum):
    PROMOTION = "promotion"
    REVOCATION = "revocation"


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


@dataclass(frozen=True, kw_only=True)
class Record:
    """A parsed record: what was promoted (or revoked) where, and the custody evidence."""

    kind: RecordKind
    repository: str
    digest: str
    environment: str
    promoted_from: str | None = None
    at: str
    by: str
    source: Source = field(default_factory=Source)
    tests: Tests | None = None
    scan: Scan | None = None
    approvers: tuple[str, ...] = ()
    reason: str = ""
    built_as: str = ""  # the tag the digest was pushed as ("abc123"), read from the registry by ``record``
    confirmed_by_labels: tuple[str, ...] = ()  # source fields the image's own labels confirmed, sorted

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, to the second: how records write times."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def record_id(envelope: dsse.Envelope) -> str:
    """Content address of a record: the SHA-256 of its signed payload."""
    return hashlib.sha256(envelope.payload).hexdigest()


def statement(record: Record) -> dict[str, Any]:
    algorithm, _, encoded = record.digest.partition(":")
    predicate: dict[str, Any] = {"environment": record.environment}
    if record.kind is RecordKind.PROMOTION:
        if record.promoted_from:
            predicate["promotedFrom"] = record.promoted_from
        predicate["promotedAt"] = record.at
        predicate["promotedBy"] = record.by
        source = {k: v for k, v in {
            "gitCommit": record.source.git_commit, "repository": record.source.git_repository,
            "ciRunId": record.source.ci_run_id, "ciRunUrl": record.source.ci_run_url}.items() if v}
        if source:
            predicate["source"] = source
        if record.built_as:
            predicate["builtAs"] = record.built_as
        if record.confirmed_by_labels:
            predicate["confirmedByImageLabels"] = sorted(record.confirmed_by_labels)
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
        "predicateType": PROMOTION_PREDICATE if record.kind is RecordKind.PROMOTION else REVOCATION_PREDICATE,
        "predicate": predicate,
    }


def payload(record: Record) -> bytes:
    return json.dumps(statement(record), separators=(",", ":"), sort_keys=True).encode()


_read = FieldReader(RecordError)


def _text(value: Any, where: str, *, required: bool = False) -> str:
    return _read.text(value, where, required=required, max_length=MAX_TEXT)


def parse_statement(raw: bytes) -> Record:
    """Parse and validate a statement payload; the message names the bad field."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordError("payload is not a JSON in-toto Statement") from exc
    doc = _read.mapping(doc, "statement", required=True)
    if doc.get("_type") != STATEMENT_TYPE:
        raise RecordError(f"statement _type must be {STATEMENT_TYPE!r}")
    predicate_type = doc.get("predicateType")
    if predicate_type == PROMOTION_PREDICATE:
        kind = RecordKind.PROMOTION
    elif predicate_type == REVOCATION_PREDICATE:
        kind = RecordKind.REVOCATION
    else:
        raise RecordError(f"predicateType must be {PROMOTION_PREDICATE!r} or {REVOCATION_PREDICATE!r}")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise RecordError("statement must have exactly one subject (one image digest per record)")
    subject = _read.mapping(subjects[0], "subject[0]", required=True)
    name = _text(subject.get("name"), "subject[0].name", required=True)
    try:
        ref = references.parse(name)
    except references.InvalidReference as exc:
        raise RecordError(f"subject[0].name: {exc}") from exc
    if ref.tag or ref.digest or ref.repository != name:
        raise RecordError(f"subject[0].name must be a normalised repository such as {ref.repository!r}")
    digests = _read.mapping(subject.get("digest"), "subject[0].digest", required=True)
    if len(digests) != 1:
        raise RecordError("subject[0].digest must hold exactly one digest")
    ((algorithm, encoded),) = digests.items()
    digest = f"{algorithm}:{encoded}"
    if not isinstance(encoded, str) or not references.is_digest(digest):
        raise RecordError("subject[0].digest must be sha256 (64 lowercase hex) or sha512 (128)")
    pred = _read.mapping(doc.get("predicate"), "predicate", required=True)
    environment = _text(pred.get("environment"), "predicate.environment", required=True)
    reason = _text(pred.get("reason"), "predicate.reason")
    if kind is RecordKind.REVOCATION:
        return Record(kind=kind, repository=name, digest=digest, environment=environment,
                      at=_text(pred.get("revokedAt"), "predicate.revokedAt", required=True),
                      by=_text(pred.get("revokedBy"), "predicate.revokedBy", required=True), reason=reason)
    source = Source()
    if "source" in pred:
        s = _read.mapping(pred["source"], "predicate.source", required=True)
        source = Source(_text(s.get("gitCommit"), "predicate.source.gitCommit"),
                        _text(s.get("repository"), "predicate.source.repository"),
                        _text(s.get("ciRunId"), "predicate.source.ciRunId"),
                        _text(s.get("ciRunUrl"), "predicate.source.ciRunUrl"))
    tests = None
    if "tests" in pred:
        t = _read.mapping(pred["tests"], "predicate.tests", required=True)
        tests = Tests(_read.count(t.get("passed"), "predicate.tests.passed"),
                      _read.count(t.get("failed"), "predicate.tests.failed"))
    scan = None
    if "scan" in pred:
        s = _read.mapping(pred["scan"], "predicate.scan", required=True)
        findings = _read.mapping(s.get("findings", {}), "predicate.scan.findings", required=True)
        unknown = set(findings) - set(SEVERITIES)
        if unknown:
            raise RecordError(f"predicate.scan.findings: unknown severity {sorted(unknown)[0]!r}")
        scan = Scan(_text(s.get("scanner"), "predicate.scan.scanner"),
                    {k: _read.count(v, f"predicate.scan.findings.{k}") for k, v in findings.items()})
    approvers = pred.get("approvers", [])
    if not isinstance(approvers, list):
        raise RecordError("predicate.approvers must be a list of strings")
    built_as = _text(pred.get("builtAs"), "predicate.builtAs")
    if "builtAs" in pred and not references.is_tag(built_as):
        raise RecordError('predicate.builtAs must be a tag: letters, digits, "_", "." and "-", at most 128 '
                          'characters, not starting with "." or "-"')
    return Record(
        kind=kind, repository=name, digest=digest, environment=environment,
        promoted_from=_text(pred.get("promotedFrom"), "predicate.promotedFrom") or None,
        at=_text(pred.get("promotedAt"), "predicate.promotedAt", required=True),
        by=_text(pred.get("promotedBy"), "predicate.promotedBy", required=True),
        source=source, tests=tests, scan=scan,
        approvers=_read.strings(approvers, "predicate.approvers"), reason=reason,
        built_as=built_as, confirmed_by_labels=_confirmed(pred.get("confirmedByImageLabels"), source),
    )


def unpaired_surrogate(payload: bytes) -> str | None:
    """Where the statement holds text that is not Unicode, or None.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``); Python reads it into a string that no
    UTF-8 output can carry. The store refuses such records at the door (``Ledger.submit``); records
    stored before keep being read and printed, escaped.
    """
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None  # not for this check to say: the statement's own parse names the problem

    def walk(value: Any, where: str) -> str | None:
        if isinstance(value, str):
            return where if _has_surrogate(value) else None
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else key
                found = path if _has_surrogate(key) else walk(item, path)
                if found:
                    return found
        if isinstance(value, list):
            for index, item in enumerate(value):
                found = walk(item, f"{where}[{index}]")
                if found:
                    return found
        return None

    return walk(document, "")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _confirmed(value: Any, source: Source) -> tuple[str, ...]:
    """``confirmedByImageLabels``: known source fields, each once, each present in the record's source."""
    where = "predicate.confirmedByImageLabels"
    names = _read.strings(value, where)
    present = {"gitCommit": source.git_commit, "ciRunId": source.ci_run_id, "repository": source.git_repository}
    for name in names:
        if name not in present:
            raise RecordError(f"{where}: unknown source field {name!r} (known: {', '.join(LABELLED_SOURCE_FIELDS)})")
        if not present[name]:
            raise RecordError(f"{where}: {name} is confirmed but predicate.source.{name} is empty")
    if len(set(names)) != len(names):
        raise RecordError(f"{where} names a field twice")
    return tuple(sorted(names))


def record_json(record: Record) -> dict[str, Any]:
    """The record as people and tools read it (the statement's predicate, flattened)."""
    data: dict[str, Any] = {
        "kind": str(record.kind), "repository": record.repository, "digest": record.digest,
        "environment": record.environment, "at": record.at, "by": record.by,
    }
    if record.kind is RecordKind.PROMOTION:
        data["promotedFrom"] = record.promoted_from
        data["source"] = {"gitCommit": record.source.git_commit, "repository": record.source.git_repository,
                          "ciRunId": record.source.ci_run_id, "ciRunUrl": record.source.ci_run_url}
        data["tests"] = None if record.tests is None else {"passed": record.tests.passed,
                                                            "failed": record.tests.failed}
        data["scan"] = None if record.scan is None else {"scanner": record.scan.scanner,
                                                          "findings": dict(record.scan.findings)}
        data["approvers"] = list(record.approvers)
        data["builtAs"] = record.built_as or None
        data["confirmedByImageLabels"] = list(record.confirmed_by_labels)
    data["reason"] = record.reason
    return data


@dataclass(frozen=True)
class SignedRecord:
    """An envelope together with the record its payload states."""

    envelope: dsse.Envelope
    record: Record

    @property
    def id(self) -> str:
        return record_id(self.envelope)


def open_envelope(document: Any) -> SignedRecord:
    """Parse a DSSE envelope (JSON text, bytes or a decoded object) and the statement inside it.

    The one parse every caller uses (the record API, the CLI's ``submit``, the operator, the store's
    reads): any problem with either layer is one :class:`MalformedEnvelope`.
    """
    try:
        envelope = dsse.parse(document)
        return SignedRecord(envelope, parse_statement(envelope.payload))
    except (dsse.EnvelopeError, RecordError) as exc:
        raise MalformedEnvelope(str(exc)) from exc
