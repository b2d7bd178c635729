"""Records in and out: submit a signed record, ask a digest's status, trace its chain of custody.

The one use case behind the record API, the CLI's local-store mode and the operator. Its answers are
typed outcomes, not HTTP: each shell decides what a :class:`Refused` or a :class:`Duplicate` means for
its own callers (a status code, an exit code, a Promotion's phase).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from webhook.core import dsse, promotion_rules, references
from webhook.core.errors import InvalidInput
from webhook.core.policy import Policy
from webhook.core.promotion import Lookup, Promotion, PromotionStatus, StoredRecord, Subject, TagPromotion, TagSubject
from webhook.core.records import RecordKind, SignedRecord, open_envelope, record_id, unpaired_surrogate
from webhook.store.errors import DuplicateRecord
from webhook.store.sql import MAX_EVENT_READ_CHARS, AuditPage, AuditQuery, SqlStore

MAX_ADMISSIONS = 1000
MAX_ADMISSION_CHARS = 4 * 1024 * 1024  # event text in one trace; the rest is one 'audit --image' away


@dataclass(frozen=True)
class Stored:
    """The receipt of a stored record."""

    id: str
    seq: int
    kind: RecordKind
    repository: str
    digest: str
    environment: str

    @classmethod
    def of(cls, stored: StoredRecord) -> Stored:
        record = stored.record
        return cls(stored.id, stored.seq, record.kind, record.repository, record.digest, record.environment)


@dataclass(frozen=True)
class Duplicate:
    record_id: str
    message: str


@dataclass(frozen=True)
class Refused:
    rule: str
    message: str


@dataclass(frozen=True)
class Malformed:
    message: str


@dataclass(frozen=True)
class Forbidden:
    message: str


SubmitOutcome = Stored | Duplicate | Refused | Malformed | Forbidden


@dataclass(frozen=True)
class Signer:
    """One signature of a record, as a person reads it: the key, the policy's name for it, and whether
    the signature verifies with that key (an envelope's ``keyid`` alone is only a claim)."""

    key_id: str
    name: str  # "" when the policy names no key with this id
    verified: bool

EXPECTABLE = ("digest", "environment", "repository")


@dataclass(frozen=True)
class Trace:
    """Everything known about one digest: its records, their state per environment, its admissions."""

    digest: str
    records: tuple[StoredRecord, ...]
    states: Mapping[str, Mapping[str, PromotionStatus]]  # repository -> environment -> state
    admissions: AuditPage = field(default_factory=lambda: AuditPage([], None))
    signers: Mapping[str, tuple[Signer, ...]] = field(default_factory=dict)  # record id -> its signers

    @property
    def promotions(self) -> tuple[StoredRecord, ...]:
        return tuple(s for s in self.records if s.record.kind is RecordKind.PROMOTION)

    @property
    def revocations(self) -> tuple[StoredRecord, ...]:
        return tuple(s for s in self.records if s.record.kind is RecordKind.REVOCATION)


def _expectation_problem(signed: SignedRecord, expect: Mapping[str, Any]) -> str | None:
    record = signed.record
    actual = {"digest": record.digest, "environment": record.environment, "repository": record.repository}
    for name in EXPECTABLE:
        if name in expect and expect[name] != actual[name]:
            return f"envelope is for {name} {actual[name]!r}, not {expect[name]!r}"
    return None


class Ledger:
    """The store seen through the policy's promotion rules."""

    def __init__(self, store: SqlStore, policy: Policy) -> None:
        self.store = store
        self.policy = policy

    def submit(self, envelope: Any, identity: str, may_write: Callable[[str], bool],
               expect: Mapping[str, Any] | None = None) -> SubmitOutcome:
        """Parse, authorise, check and store one envelope; raises ``StoreError`` only.

        ``expect`` binds the envelope to what the caller means to submit: a replayed envelope for
        another digest or environment is refused instead of silently recording something else.
        """
        try:
            signed = open_envelope(envelope)
        except InvalidInput as exc:
            return Malformed(str(exc))
        where = unpaired_surrogate(signed.envelope.payload)
        if where is not None:
            return Malformed(f"malformed envelope: statement: {where} holds an unpaired UTF-16 surrogate (an escape "
                             "such as \\ud800 without its pair), which is not Unicode text")
        record = signed.record
        if not may_write(record.environment):
            return Forbidden(f'identity "{identity}" may not write records for environment "{record.environment}"')
        problem = _expectation_problem(signed, expect or {})
        if problem:
            return Refused("replay", problem)

        def check(existing: Sequence[StoredRecord]) -> None:
            promotion_rules.check_acceptance(self.policy, signed.envelope, record, existing)

        try:
            return Stored.of(self.store.add_record(signed, identity, check))
        except promotion_rules.RuleViolation as exc:
            return Refused(exc.rule, str(exc))
        except DuplicateRecord as exc:
            return Duplicate(exc.record_id, str(exc))

    def status(self, ref: references.ImageReference) -> dict[str, PromotionStatus]:
        """The promotion state of one pinned image in every environment of the policy."""
        assert ref.digest is not None
        return promotion_rules.evaluate(self.policy, self.store.records_for_digest(ref.digest), ref.repository,
                                        ref.digest)

    def signers(self, stored: StoredRecord) -> tuple[Signer, ...]:
        """Who signed a record: the policy's keys whose signatures verify, then the other key ids claimed."""
        verified = dsse.verified_key_ids(stored.envelope, self.policy.named_keys.values())
        found = [Signer(k, self.policy.key_name(k), True) for k in sorted(verified)]
        for claimed in dict.fromkeys(s.keyid for s in stored.envelope.signatures):
            if claimed not in verified:
                found.append(Signer(claimed, "", False))
        return tuple(found)

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        """Admission's two questions, answered from one query as admission answers them (``check``, ``pin``)."""
        stored = self.store.records_for_subjects([digest for _, digest in subjects], tags)
        evaluated: dict[Subject, dict[str, PromotionStatus]] = {}

        def states(repository: str, digest: str) -> dict[str, PromotionStatus]:
            if (repository, digest) not in evaluated:
                evaluated[(repository, digest)] = promotion_rules.evaluate(self.policy, stored.get(digest, []),
                                                                            repository, digest)
            return evaluated[(repository, digest)]

        statuses = {(r, d): states(r, d).get(environment, PromotionStatus(Promotion.NOT_PROMOTED))
                    for r, d in subjects}
        every = [s for found in stored.values() for s in found]
        answers: dict[TagSubject, TagPromotion] = {}
        for repository, tag in tags:
            statements = promotion_rules.tag_statements(every, repository, tag)
            answers[(repository, tag)] = promotion_rules.promoted_for_tag(
                statements, environment, functools.partial(states, repository))
        return Lookup(statuses, answers)

    def trace(self, digest: str, *, max_event_chars: int | None = MAX_EVENT_READ_CHARS) -> Trace:
        """Records, states and the admissions that named the digest (at most MAX_ADMISSIONS of them and
        MAX_ADMISSION_CHARS of event text: ``admissions.next`` says where the rest continues)."""
        # Only what the rules count: a row whose id is not its content address, or a second copy of a
        # payload, is not part of anyone's chain of custody.
        stored = promotion_rules.authentic(self.store.records_for_digest(digest))
        states = {repository: promotion_rules.evaluate(self.policy, stored, repository, digest)
                  for repository in sorted({s.record.repository for s in stored})}
        admissions = self.store.audit_page(AuditQuery(digest=digest), limit=MAX_ADMISSIONS,
                                           max_chars=MAX_ADMISSION_CHARS, max_event_chars=max_event_chars)
        return Trace(digest, tuple(stored), states, admissions, {s.id: self.signers(s) for s in stored})

    def find(self, *, repository: str | None = None, digest: str | None = None, environment: str | None = None,
             limit: int = 100, after: int = 0) -> list[StoredRecord]:
        found = self.store.find_records(repository=repository, digest=digest, environment=environment, limit=limit,
                                        after=after)
        return [s for s in found if s.id == record_id(s.envelope)]
