"""Promotion rules: which records the store accepts, and which records admit a digest.

Both questions are pure functions of the policy and the records already stored for a digest, so the
HTTP API, the CLI's local-store mode, the operator and admission all share them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from webhook.core import dsse, records
from webhook.core.errors import Refused
from webhook.core.policy import Environment, Policy
from webhook.core.promotion import Promotion, PromotionStatus, StoredRecord, TagPromotion
from webhook.core.records import Record, RecordKind


class RuleViolation(Refused):
    """A record that breaks a promotion rule; ``rule`` names it, the message says what is missing."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"rule {rule}: {message}")
        self.rule = rule


def short(key_id: str) -> str:
    return key_id[:12]


Verifier = Callable[[StoredRecord, Environment], frozenset[str]]


def verify_signatures(stored: StoredRecord, environment: Environment) -> frozenset[str]:
    return dsse.verified_key_ids(stored.envelope, environment.trusted_keys)


def _signature_problem(verified: frozenset[str], environment: Environment) -> str | None:
    if not environment.trusted_keys:
        return f'environment "{environment.name}" trusts no signing keys (policy: environments[].trustedKeys)'
    if len(verified) < environment.required_signatures:
        trusted = ", ".join(short(k) for k in sorted(environment.trusted_key_ids))
        return (f'environment "{environment.name}" requires {environment.required_signatures} signature(s) from '
                f"distinct trusted keys, found {len(verified)} (trusted keys: {trusted})")
    return None


def authentic(stored: Sequence[StoredRecord]) -> list[StoredRecord]:
    """The records whose id is their content address, each payload once, in the order they were stored.

    A row whose id is not the SHA-256 of its payload was not written by the store (which computes the
    id itself): it is ignored. A payload stored twice counts once, at its first place in the log, so a
    copy of an old record inserted after a revocation can never outlive that revocation.
    """
    seen: set[str] = set()
    found: list[StoredRecord] = []
    for item in sorted(stored, key=lambda s: s.seq):
        if item.id in seen or item.id != records.record_id(item.envelope):
            continue
        seen.add(item.id)
        found.append(item)
    return found


def _built_on(policy: Policy, index: int) -> bool:
    """Whether the environment at ``index`` is built on the one before it (``requirePrevious``)."""
    return index > 0 and policy.environments[index].require_previous


def evaluate(
    policy: Policy, stored: Sequence[StoredRecord], repository: str, digest: str,
    verifier: Verifier = verify_signatures,
) -> dict[str, PromotionStatus]:
    """The current promotion state of one digest in every environment of the policy.

    The rule (docs/records.md, "Revocation"): a promotion record in an environment counts only when it
    was stored after the last revocation of that environment AND after the last revocation of every
    earlier environment it is built on (the chain of ``requirePrevious`` links), its signatures and
    evidence satisfy today's policy, and the previous environment stands promoted. So after a
    revocation every later environment needs a new promotion with its own signatures: a re-promotion
    upstream, whatever key signs it, never revives a record downstream.
    """
    relevant = [s for s in authentic(stored) if s.record.digest == digest and s.record.repository == repository]
    states: dict[str, PromotionStatus] = {}
    floor, floor_from = 0, ""  # the last revocation this environment is built on, and where it was made
    for index, environment in enumerate(policy.environments):
        in_env = [s for s in relevant if s.record.environment == environment.name]
        own = max((s.seq for s in in_env if s.record.kind is RecordKind.REVOCATION), default=0)
        if not _built_on(policy, index):
            floor, floor_from = 0, ""
        if own > floor:
            floor, floor_from = own, environment.name
        promotions = [s for s in in_env if s.record.kind is RecordKind.PROMOTION]
        candidates = [s for s in promotions if s.seq > floor]
        if not candidates:
            # "revoked" only where a revocation (here or upstream) took a promotion away, or was made here.
            revoked = bool(own) or any(s.seq <= floor for s in promotions)
            states[environment.name] = PromotionStatus(Promotion.NOT_PROMOTED, detail="revoked" if revoked else "",
                                                       revoked_from=floor_from if revoked else "")
            continue
        previous = policy.environments[index - 1] if index > 0 else None
        problem = ""
        admitted: StoredRecord | None = None
        for candidate in reversed(candidates):  # newest valid record wins
            problem_here = (_signature_problem(verifier(candidate, environment), environment)
                            or _record_problem(policy, environment, candidate.record))
            if problem_here is None and environment.require_previous and previous is not None:
                prior = states.get(previous.name)
                if prior is None or prior.state is not Promotion.PROMOTED:
                    problem_here = f'chain broken: no valid record in "{previous.name}" for this digest'
            if problem_here is None:
                admitted = candidate
                break
            problem = problem or problem_here
        if admitted is not None:
            states[environment.name] = PromotionStatus(Promotion.PROMOTED, record_ids=(admitted.id,))
        else:
            states[environment.name] = PromotionStatus(Promotion.UNTRUSTED, detail=problem)
    promoted_to = tuple(name for name, s in states.items() if s.state is Promotion.PROMOTED)
    return {name: replace(s, promoted_to=promoted_to) for name, s in states.items()}


def tag_statements(stored: Sequence[StoredRecord], repository: str, tag: str) -> list[StoredRecord]:
    """The authentic promotion records of ``repository`` that state it was built as ``tag``, newest first."""
    return [s for s in reversed(authentic(stored)) if s.record.kind is RecordKind.PROMOTION
            and s.record.repository == repository and s.record.built_as == tag]


def promoted_for_tag(statements: Sequence[StoredRecord], environment: str,
                     states: Callable[[str], Mapping[str, PromotionStatus]]) -> TagPromotion:
    """The digest promoted to ``environment`` that a valid record states was built as the tag.

    ``statements`` come from :func:`tag_statements`; ``states(digest)`` is :func:`evaluate` for the
    tag's repository. A statement counts only when its record is the one that admits the digest in its
    own environment (valid signatures and evidence under today's policy, not revoked). Of the digests
    stated, the newest one that stands promoted in ``environment`` is the answer.
    """
    built: list[str] = []
    for statement in statements:
        digest = statement.record.digest
        if digest in built:
            continue
        own = states(digest).get(statement.record.environment)
        if own is not None and own.state is Promotion.PROMOTED and statement.id in own.record_ids:
            built.append(digest)
    for digest in built:
        there = states(digest).get(environment)
        if there is not None and there.state is Promotion.PROMOTED:
            return TagPromotion(digest=digest, built=tuple(built))
    return TagPromotion(built=tuple(built))


def _record_problem(policy: Policy, environment: Environment, record: Record) -> str | None:
    """What today's policy says against a record's content (its origin and its evidence), if anything."""
    try:
        _check_origin(policy, environment, record)
        _check_evidence(environment, record)
    except RuleViolation as exc:
        return str(exc)
    return None


def check_acceptance(policy: Policy, envelope: dsse.Envelope, record: Record,
                     existing: Sequence[StoredRecord]) -> None:
    """Raise :class:`RuleViolation` when the store must refuse this record."""
    environment = policy.environment(record.environment)
    if environment is None:
        defined = ", ".join(policy.environment_names) or "none"
        raise RuleViolation("environment", f'environment "{record.environment}" is not defined in the policy '
                                           f"(defined: {defined})")
    verified = dsse.verified_key_ids(envelope, environment.trusted_keys)
    if record.kind is RecordKind.REVOCATION:
        if not environment.trusted_keys or not verified:
            raise RuleViolation("signatures", f'a revocation for "{environment.name}" must be signed by one of its '
                                              "trusted keys")
        if not any(s.record.kind is RecordKind.PROMOTION and s.record.environment == environment.name
                   and s.record.digest == record.digest and s.record.repository == record.repository
                   for s in existing):
            raise RuleViolation("revocation", f'{record.reference} was never promoted to "{environment.name}"; '
                                              "nothing to revoke")
        return
    problem = _signature_problem(verified, environment)
    if problem:
        raise RuleViolation("signatures", problem)
    _check_origin(policy, environment, record)
    previous = policy.previous_environment(environment.name)
    if previous is not None and environment.require_previous:
        states = evaluate(policy, existing, record.repository, record.digest)
        if states[previous.name].state is not Promotion.PROMOTED:
            raise RuleViolation("requirePrevious", f'{record.reference} has no valid record in "{previous.name}"; '
                                                   f'promote it to "{previous.name}" first (no skipping)')
    _check_evidence(environment, record)


def _check_origin(policy: Policy, environment: Environment, record: Record) -> None:
    previous = policy.previous_environment(environment.name)
    if previous is None:
        if record.promoted_from:
            raise RuleViolation("promotedFrom", f'"{environment.name}" is the first environment; promotedFrom must be '
                                                f'absent, got "{record.promoted_from}"')
    elif environment.require_previous and record.promoted_from != previous.name:
        raise RuleViolation("promotedFrom", f'records for "{environment.name}" must be promoted from '
                                            f'"{previous.name}", got "{record.promoted_from or "(none)"}"')


def _check_evidence(environment: Environment, record: Record) -> None:
    rules = environment.evidence
    name = environment.name
    if rules.max_tests_failed is not None or rules.min_tests_passed is not None:
        if record.tests is None:
            raise RuleViolation("evidence.tests", f'"{name}" requires test results (tests passed/failed) in the record')
        if rules.max_tests_failed is not None and record.tests.failed > rules.max_tests_failed:
            raise RuleViolation("evidence.maxTestsFailed", f'"{name}" allows at most {rules.max_tests_failed} failed '
                                                           f"tests; the record has {record.tests.failed}")
        if rules.min_tests_passed is not None and record.tests.passed < rules.min_tests_passed:
            raise RuleViolation("evidence.minTestsPassed", f'"{name}" requires at least {rules.min_tests_passed} '
                                                           f"passed tests; the record has {record.tests.passed}")
    if rules.max_scan_findings:
        if record.scan is None:
            raise RuleViolation("evidence.scan", f'"{name}" requires scan results in the record')
        for severity, limit in rules.max_scan_findings.items():
            found = record.scan.findings.get(severity)
            if found is None:
                raise RuleViolation(f"evidence.maxScanFindings.{severity}",
                                    f'"{name}" requires the number of {severity} scan findings; the record has none')
            if found > limit:
                raise RuleViolation(f"evidence.maxScanFindings.{severity}",
                                    f'"{name}" allows at most {limit} {severity} scan findings; the record has {found}')
    if rules.require_source and not (record.source.git_commit and record.source.ci_run_id):
        raise RuleViolation("evidence.requireSource", f'"{name}" requires the source git commit and CI run id')
    if rules.require_image_labels:
        missing = [words for field, words in (("gitCommit", "git commit"), ("ciRunId", "CI run"))
                   if field not in record.confirmed_by_labels]
        if missing:
            raise RuleViolation("evidence.requireImageLabels",
                                f'"{name}" requires the git commit and the CI run confirmed by the image\'s own '
                                f"labels; not confirmed: {', '.join(missing)}. Build with --label git.commit=… --label "
                                "ci.run=… and record the image from its registry (promotion-gate record REPO:TAG)")
