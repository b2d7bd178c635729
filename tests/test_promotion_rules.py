"""The promotion rules as tables of cases, without a database: what the store accepts, what admits.

Each case is a history of submissions, in order. A submission goes through ``check_acceptance``
exactly as the store runs it inside its write transaction (refused ones are not appended), or, for
the cases that play someone with write access to the database, is appended without it. The expected
states are what ``evaluate`` answers afterwards: the input admission judges by.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

import pytest

from webhook.core import dsse, keys, promotion_rules, records
from webhook.core.policy import Environment, Evidence, Mode, Policy
from webhook.core.promotion import Promotion, PromotionStatus, StoredRecord
from webhook.core.records import Record, RecordKind

REPOSITORY = "ghcr.io/acme/payment-api"
DIGEST = "sha256:" + "f8a2" * 16
PREVIOUS = {"ci": None, "staging": "ci", "production": "staging"}


@cache
def key(name: str) -> keys.SigningKey:
    return keys.generate("ecdsa-p256" if name == "approver-b" else "ed25519")


def policy(*, production_requires_previous: bool = True) -> Policy:
    def environment(name: str, trusted: Sequence[str], required: int = 1, **extra: object) -> Environment:
        return Environment(name=name, mode=Mode.ENFORCE, trusted_keys=tuple(key(k).verifying for k in trusted),
                           required_signatures=required, **extra)  # type: ignore[arg-type]

    return Policy(environments=(
        environment("ci", ["ci"], evidence=Evidence(max_tests_failed=0)),
        environment("staging", ["ci", "release"]),
        environment("production", ["release", "approver-a", "approver-b"], 2,
                    require_previous=production_requires_previous),
    ))


@dataclass(frozen=True)
class Step:
    """One submission: a promotion (or revocation) of the digest, signed by these keys."""

    environment: str
    signers: tuple[str, ...]
    kind: RecordKind = RecordKind.PROMOTION
    refused: str = ""  # the rule check_acceptance names, when the store must refuse it
    direct: bool = False  # appended without check_acceptance: someone writing to the database
    tests_failed: int = 0
    copy_of: int | None = None  # append a copy of the step with this index (same payload)
    fake_id: bool = False  # the copy gets a made-up id instead of its content address


def promote(environment: str, *signers: str, refused: str = "", **extra: object) -> Step:
    return Step(environment, signers, refused=refused, **extra)  # type: ignore[arg-type]


def revoke(environment: str, signer: str, refused: str = "") -> Step:
    return Step(environment, (signer,), RecordKind.REVOCATION, refused)


CHAIN = (promote("ci", "ci"), promote("staging", "ci"), promote("production", "release", "approver-a"))
P, N, U = "promoted", "not-promoted", "untrusted"

# name: (steps, states of ci/staging/production, the environment each not-promoted state was revoked from)
CASES: dict[str, tuple[tuple[Step, ...], tuple[str, str, str], tuple[str, str, str]]] = {
    "promoted through the chain": (CHAIN, (P, P, P), ("", "", "")),
    "production not promoted yet": (CHAIN[:2], (P, P, N), ("", "", "")),
    "revoking production": ((*CHAIN, revoke("production", "release")), (P, P, N), ("", "", "production")),
    "revoking staging takes production with it": (
        (*CHAIN, revoke("staging", "ci")), (P, N, N), ("", "staging", "staging")),
    "re-promoting staging with the CI key does not revive production": (
        (*CHAIN, revoke("staging", "ci"), promote("staging", "ci")), (P, P, N), ("", "", "staging")),
    "production needs two signatures again after an upstream revocation": (
        (*CHAIN, revoke("staging", "ci"), promote("staging", "ci"), promote("production", "release", "approver-b")),
        (P, P, P), ("", "", "")),
    "one production key is not enough for the new promotion": (
        (*CHAIN, revoke("staging", "ci"), promote("staging", "ci"),
         promote("production", "release", refused="signatures")), (P, P, N), ("", "", "staging")),
    "revoking ci takes every later environment": (
        (*CHAIN, revoke("ci", "ci")), (N, N, N), ("ci", "ci", "ci")),
    "re-recording ci revives only ci": (
        (*CHAIN, revoke("ci", "ci"), promote("ci", "ci", tests_failed=0)), (P, N, N), ("", "ci", "ci")),
    "staging re-promoted after ci, production still needs its own": (
        (*CHAIN, revoke("ci", "ci"), promote("ci", "ci"), promote("staging", "ci")), (P, P, N), ("", "", "ci")),
    "the whole chain again after revoking ci": (
        (*CHAIN, revoke("ci", "ci"), promote("ci", "ci"), promote("staging", "release"),
         promote("production", "approver-a", "approver-b")), (P, P, P), ("", "", "")),
    "a revocation before a promotion does not count against it": (
        (promote("ci", "ci"), revoke("ci", "ci"), promote("ci", "ci")), (P, N, N), ("", "", "")),
    "staging cannot be promoted while ci is revoked": (
        (promote("ci", "ci"), revoke("ci", "ci"), promote("staging", "ci", refused="requirePrevious")),
        (N, N, N), ("ci", "", "")),
    "revoking what was never promoted there is refused": (
        (promote("ci", "ci"), revoke("staging", "ci", refused="revocation")), (P, N, N), ("", "", "")),
    "a revocation needs a key the environment trusts": (
        (*CHAIN, revoke("production", "ci", refused="signatures")), (P, P, P), ("", "", "")),
    # Someone with write access to the database, not to the keys:
    "a copy of an old production record with a made-up id is ignored": (
        (*CHAIN, revoke("staging", "ci"), promote("staging", "ci"), Step("production", (), copy_of=2, fake_id=True)),
        (P, P, N), ("", "", "staging")),
    "a payload stored twice counts at its first place": (
        (*CHAIN, revoke("staging", "ci"), promote("staging", "ci"), Step("production", (), copy_of=2)),
        (P, P, N), ("", "", "staging")),
    "evidence is judged by today's policy, even for a record the store never checked": (
        (promote("ci", "ci", direct=True, tests_failed=3),), (U, N, N), ("", "", "")),
    "a record signed by a key the environment does not trust, inserted directly": (
        (promote("ci", "ci"), promote("staging", "ci"), promote("production", "release", direct=True)),
        (P, P, U), ("", "", "")),
}


def run(steps: Sequence[Step], rules: Policy) -> list[StoredRecord]:
    stored: list[StoredRecord] = []
    seq = itertools.count(1)
    for index, step in enumerate(steps):
        if step.copy_of is not None:
            original = stored_by_step[step.copy_of]
            record_id = "0" * 64 if step.fake_id else original.id
            stored.append(replace(original, seq=next(seq), id=record_id))
            continue
        record = Record(
            kind=step.kind, repository=REPOSITORY, digest=DIGEST, environment=step.environment,
            promoted_from=PREVIOUS[step.environment] if step.kind is RecordKind.PROMOTION else None,
            at=f"2026-11-28T10:00:{index:02d}Z", by="pipeline",
            tests=records.Tests(10, step.tests_failed) if step.kind is RecordKind.PROMOTION else None,
            reason="incident" if step.kind is RecordKind.REVOCATION else "")
        envelope = dsse.sign(records.payload(record), [key(s) for s in step.signers])
        try:
            if not step.direct:
                promotion_rules.check_acceptance(rules, envelope, record, stored)
        except promotion_rules.RuleViolation as exc:
            assert exc.rule == step.refused, f"step {index}: refused by {exc.rule}, expected {step.refused or 'stored'}"
            continue
        assert not step.refused, f"step {index}: stored, expected a refusal by {step.refused}"
        stored_by_step[index] = StoredRecord(seq=next(seq), id=records.record_id(envelope), record=record,
                                             envelope=envelope)
        stored.append(stored_by_step[index])
    return stored


stored_by_step: dict[int, StoredRecord] = {}


@pytest.mark.parametrize("name", CASES)
def test_revocation_table(name: str) -> None:
    steps, expected, revoked_from = CASES[name]
    stored_by_step.clear()
    states = promotion_rules.evaluate(policy(), run(steps, policy()), REPOSITORY, DIGEST)
    assert tuple(states[e].state.value for e in ("ci", "staging", "production")) == expected
    assert tuple(states[e].revoked_from for e in ("ci", "staging", "production")) == revoked_from


def test_production_without_require_previous_stands_on_its_own() -> None:
    # requirePrevious: false cuts the chain: production is not built on staging, so a revocation in
    # staging leaves it promoted (and so does one in ci).
    rules = policy(production_requires_previous=False)
    stored_by_step.clear()
    steps = (*CHAIN[:2], promote("production", "release", "approver-a"), revoke("staging", "ci"),
             revoke("ci", "ci"))
    states = promotion_rules.evaluate(rules, run(steps, rules), REPOSITORY, DIGEST)
    assert [states[e].state for e in ("ci", "staging", "production")] == [
        Promotion.NOT_PROMOTED, Promotion.NOT_PROMOTED, Promotion.PROMOTED]


def test_untrusted_states_say_why() -> None:
    stored_by_step.clear()
    steps = (promote("ci", "ci"), promote("staging", "ci"), promote("production", "release", direct=True))
    production = promotion_rules.evaluate(policy(), run(steps, policy()), REPOSITORY, DIGEST)["production"]
    trusted = ", ".join(promotion_rules.short(k) for k in sorted(policy().environments[2].trusted_key_ids))
    assert production.detail == ('environment "production" requires 2 signature(s) from distinct trusted keys, '
                                 f"found 1 (trusted keys: {trusted})")
    stored_by_step.clear()
    failed = promotion_rules.evaluate(policy(), run((promote("ci", "ci", direct=True, tests_failed=3),), policy()),
                                      REPOSITORY, DIGEST)["ci"]
    assert failed.detail == 'rule evidence.maxTestsFailed: "ci" allows at most 0 failed tests; the record has 3'


def test_promoted_to_lists_every_promoted_environment() -> None:
    stored_by_step.clear()
    states = promotion_rules.evaluate(policy(), run(CHAIN[:2], policy()), REPOSITORY, DIGEST)
    assert {name: s.promoted_to for name, s in states.items()} == dict.fromkeys(
        ("ci", "staging", "production"), ("ci", "staging"))
    assert dataclasses.asdict(states["staging"])["record_ids"] == (stored_by_step[1].id,)


# --- which digest is promoted for a tag -----------------------------------------------------------

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OTHER = "ghcr.io/acme/other"


@dataclass(frozen=True)
class Build:
    """A record of one digest: in ``environment``, maybe stating it was built as ``tag``."""

    environment: str
    digest: str
    tag: str = ""
    signer: str = "ci"
    kind: RecordKind = RecordKind.PROMOTION
    repository: str = REPOSITORY
    direct: bool = False  # appended without check_acceptance


def builds(steps: Sequence[Build]) -> list[StoredRecord]:
    rules, stored = policy(), list[StoredRecord]()
    for seq, step in enumerate(steps, start=1):
        promotion = step.kind is RecordKind.PROMOTION
        record = Record(kind=step.kind, repository=step.repository, digest=step.digest, environment=step.environment,
                        promoted_from=PREVIOUS[step.environment] if promotion else None,
                        at=f"2026-11-28T10:00:{seq:02d}Z", by="pipeline",
                        tests=records.Tests(10, 0) if promotion else None, built_as=step.tag,
                        reason="" if promotion else "incident")
        envelope = dsse.sign(records.payload(record), [key(step.signer)])
        if not step.direct:
            promotion_rules.check_acceptance(rules, envelope, record, [s for s in stored
                                                                       if s.record.digest == step.digest])
        stored.append(StoredRecord(seq=seq, id=records.record_id(envelope), record=record, envelope=envelope))
    return stored


# name: (records, the digest promoted to staging for :abc123, every digest valid records say was built as it)
TAG_CASES: dict[str, tuple[tuple[Build, ...], str, tuple[str, ...]]] = {
    "built and promoted": ((Build("ci", D1, "abc123"), Build("staging", D1)), D1, (D1,)),
    "built, not promoted to staging yet": ((Build("ci", D1, "abc123"),), "", (D1,)),
    "revoked from staging": ((Build("ci", D1, "abc123"), Build("staging", D1),
                              Build("staging", D1, kind=RecordKind.REVOCATION)), "", (D1,)),
    "the tag moved; the new build is not promoted yet: the old digest stands": (
        (Build("ci", D1, "abc123"), Build("staging", D1), Build("ci", D2, "abc123")), D1, (D2, D1)),
    "the tag moved and the new build was promoted: the newest wins": (
        (Build("ci", D1, "abc123"), Build("staging", D1), Build("ci", D2, "abc123"), Build("staging", D2)),
        D2, (D2, D1)),
    "a statement signed by a key ci does not trust counts for nothing": (
        (Build("ci", D1), Build("staging", D1), Build("ci", D1, "abc123", signer="outsider", direct=True)), "", ()),
    "another repository's build with the same tag": (
        (Build("ci", D1, "abc123", repository=OTHER), Build("staging", D1, repository=OTHER)), "", ()),
    "a tag stated only downstream, by a valid record, counts": (
        (Build("ci", D1), Build("staging", D1, "abc123")), D1, (D1,)),
}


@pytest.mark.parametrize("name", TAG_CASES)
def test_the_digest_promoted_for_a_tag(name: str) -> None:
    steps, digest, built = TAG_CASES[name]
    stored = builds(steps)
    statements = promotion_rules.tag_statements(stored, REPOSITORY, "abc123")

    def states(d: str) -> dict[str, PromotionStatus]:
        return promotion_rules.evaluate(policy(), stored, REPOSITORY, d)

    answer = promotion_rules.promoted_for_tag(statements, "staging", states)
    assert (answer.digest, answer.built) == (digest, built)
