"""The policy core: (request, policy, environment, record view) -> verdict. No I/O of its own.

Everything this function needs from the outside world is passed in: the namespace's environment
(already resolved) and a :class:`RecordView` that answers promotion questions. That makes the rules
testable as tables and lets the HTTP layer, ``check`` and the benchmarks share one implementation.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from webhook import references, workloads
from webhook.admission import AdmissionRequest
from webhook.findings import Finding, Reason, warning_line
from webhook.policy import Mode, Policy

FINDING_REASONS = frozenset(
    {
        Reason.MUTABLE_TAG,
        Reason.INVALID_REFERENCE,
        Reason.NOT_PROMOTED,
        Reason.UNTRUSTED_RECORD,
        Reason.NO_ENVIRONMENT,
        Reason.STORE_UNAVAILABLE,
    }
)


class Promotion(enum.Enum):
    PROMOTED = "promoted"
    NOT_PROMOTED = "not-promoted"
    UNTRUSTED = "untrusted"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class PromotionStatus:
    state: Promotion
    record_ids: tuple[str, ...] = ()
    promoted_to: tuple[str, ...] = ()
    detail: str = ""


Subject = tuple[str, str]  # (normalised repository, digest)


class RecordView(Protocol):
    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        """The promotion state of each subject in one environment: one round trip per request."""
        ...


class NoRecords:
    """A view for policies without environments: nothing is ever promoted."""

    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        return {subject: PromotionStatus(Promotion.NOT_PROMOTED) for subject in subjects}


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    field_path: str
    container: str
    image: str
    repository: str = ""
    digest: str = ""
    record_ids: tuple[str, ...] = ()
    exempt: bool = False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()  # reason codes of allowed-despite: exempt, break-glass, warn-only
    warnings: tuple[str, ...] = ()
    message: str = ""
    mode: Mode = Mode.ENFORCE
    environment: str | None = None
    subject: str = ""
    images: tuple[ImageOutcome, ...] = ()
    break_glass_reason: str | None = None
    break_glass_refused: str | None = None
    skipped: str = ""  # why the request was not judged (delete, not a workload, unchanged images)

    @property
    def reasons(self) -> tuple[str, ...]:
        ordered: dict[str, None] = {}
        for finding in self.findings:
            ordered[str(finding.reason)] = None
        for note in self.notes:
            ordered[note] = None
        return tuple(ordered)


def _allowed(reason: str, **extra: Any) -> Verdict:
    return Verdict(allowed=True, skipped=reason, **extra)


def decide(
    request: AdmissionRequest,
    policy: Policy,
    environment: str | None,
    records: RecordView,
) -> Verdict:
    """Judge one admission request. Raises ``WorkloadShapeError`` for objects of the wrong shape."""
    if request.operation in ("DELETE", "CONNECT"):
        return _allowed(f"{request.operation} is never blocked")
    if request.object is None:
        return _allowed("no object")
    if not workloads.supports(request.kind):
        return _allowed(f"{request.kind} is not a workload kind")
    workload = workloads.extract(
        request.object, kind=request.kind, namespace=request.namespace, name=request.name
    )
    subject = workload.display_name
    mode = policy.mode_for(environment)
    if request.namespace in policy.exempt_namespaces:
        return Verdict(
            allowed=True, notes=(str(Reason.EXEMPT),), subject=subject, mode=mode, environment=environment,
            skipped=f"namespace {request.namespace} is exempt",
        )

    candidates = workload.images
    sets_break_glass = workload.break_glass is not None
    if request.operation == "UPDATE" and request.old_object is not None:
        old = workloads.extract(
            request.old_object, kind=request.kind, namespace=request.namespace, name=request.name
        )
        if old.deleting or workload.deleting:
            return _allowed("object is being deleted", subject=subject)
        # Only images the update introduces are judged: a scale-down, a label change or a finalizer
        # removal must never be blocked because of what is already running. Adding or changing the
        # break-glass annotation is judged in full: it is what the workload's Pods will be admitted by.
        # Removing it is not: taking the exception back must always be possible.
        sets_break_glass = sets_break_glass and old.break_glass != workload.break_glass
        if not sets_break_glass:
            before = {c.image for c in old.images}
            candidates = tuple(c for c in workload.images if c.image not in before)
            if not candidates:
                return _allowed("update changes no image", subject=subject, environment=environment, mode=mode)

    user = request.user
    # Pods and ReplicaSets are created by controllers, not by the person who broke glass: a trusted
    # controller may carry the annotation from the workload it owns, which was itself judged above.
    permitted = (user.username in policy.break_glass_users
                 or bool(policy.break_glass_groups.intersection(user.groups))
                 or (workload.controlled and user.username in policy.break_glass_controllers))
    return judge_workload(workload, candidates, user.username, permitted, policy, environment, records,
                          sets_break_glass=sets_break_glass)


def judge_workload(
    workload: workloads.Workload,
    candidates: tuple[workloads.ContainerImage, ...],
    username: str,
    break_glass_permitted: bool,
    policy: Policy,
    environment: str | None,
    records: RecordView,
    *,
    sets_break_glass: bool = False,
) -> Verdict:
    """Judge the given containers of one workload (shared by admission and the offline check).

    ``sets_break_glass``: this request adds or changes the break-glass annotation. Only people allowed
    to break glass may do that, findings or not, because controllers carry the annotation to every
    Pod the workload creates later, when its digest may have been revoked.
    """
    subject = workload.display_name
    mode = policy.mode_for(environment)
    findings: list[Finding] = []
    warnings: list[str] = []
    outcomes: list[ImageOutcome] = []
    notes: list[str] = []
    # A policy without environments is digest-only everywhere, whatever the namespaces are labelled.
    gated = environment is not None and bool(policy.environments)

    if environment is not None and policy.environments and policy.environment(environment) is None:
        findings.append(Finding(
            Reason.NO_ENVIRONMENT, subject,
            f'namespace "{workload.namespace}" is labelled environment "{environment}", which the policy does not '
            f"define (defined: {', '.join(policy.environment_names)})",
            short=f'environment "{environment}" is not defined by the policy',
        ))
        gated = False
    elif environment is None and policy.unmapped == "deny" and policy.environments:
        findings.append(Finding(
            Reason.NO_ENVIRONMENT, subject,
            f'namespace "{workload.namespace}" has no environment; label it: kubectl label namespace '
            f"{workload.namespace} promotion-gate.io/environment=<{'|'.join(policy.environment_names) or 'env'}>",
            short=f'namespace "{workload.namespace}" has no promotion-gate.io/environment label',
        ))

    classified = [(container, references.classify(container.image)) for container in candidates]
    lookups: Mapping[Subject, PromotionStatus] = {}
    if gated and environment is not None:
        pinned = list(dict.fromkeys(
            (c.reference.repository, c.reference.digest) for _, c in classified
            if c.reference is not None and c.reference.digest is not None and not _exempt(policy, c.reference)))
        if pinned:
            lookups = records.statuses(pinned, environment)
    for container, classification in classified:
        finding, outcome, warning = _judge_image(container, classification, subject, policy,
                                                 environment if gated else None, lookups)
        outcomes.append(outcome)
        if outcome.exempt and str(Reason.EXEMPT) not in notes:
            notes.append(str(Reason.EXEMPT))
        if finding:
            findings.append(finding)
        if warning:
            warnings.append(warning)

    base = Verdict(allowed=True, mode=mode, environment=environment, subject=subject, images=tuple(outcomes),
                   notes=tuple(notes), warnings=tuple(warnings))
    if not findings:
        if sets_break_glass and not break_glass_permitted and mode is Mode.ENFORCE:
            why = f'user "{username}" is not allowed to break glass'
            return replace(base, allowed=False, break_glass_refused=why, notes=(*notes, str(Reason.BREAK_GLASS)),
                           message=f"[break-glass] {subject}: only people allowed to break glass may set the "
                                   f"promotion-gate.io/break-glass annotation; {why}")
        return base

    lines = [f.line for f in findings]
    if mode is Mode.AUDIT:
        return replace(base, findings=tuple(findings), notes=(*notes, str(Reason.WARN_ONLY)))
    if mode is Mode.WARN:
        return replace(base, findings=tuple(findings), notes=(*notes, str(Reason.WARN_ONLY)),
                       warnings=(*(warning_line(f) for f in findings), *warnings))

    reason = workload.break_glass
    if reason is not None:
        permitted = break_glass_permitted
        if permitted and reason.strip():
            note = (f'[break-glass] {subject} admitted despite {len(findings)} finding(s) by "{username}": '
                    f"{reason.strip()}")
            return replace(base, findings=tuple(findings), notes=(*notes, str(Reason.BREAK_GLASS)),
                           warnings=(note, *(warning_line(f) for f in findings), *warnings),
                           break_glass_reason=reason.strip())
        why = (f'user "{username}" is not allowed to break glass' if not permitted
               else "the annotation needs a non-empty reason or ticket")
        lines.append(f"[break-glass] annotation promotion-gate.io/break-glass ignored: {why}")
        return replace(base, allowed=False, findings=tuple(findings), message="\n".join(lines),
                       break_glass_refused=why)
    return replace(base, allowed=False, findings=tuple(findings), message="\n".join(lines))


def _exempt(policy: Policy, ref: references.ImageReference) -> bool:
    # Exact match on the normalised repository, never a prefix: 'registry.k8s.io/pause' must not
    # exempt 'registry.k8s.io/pause-evil'.
    for exemption in policy.exempt_images:
        if exemption.repository != ref.repository:
            continue
        if exemption.digest is None or exemption.digest == ref.digest:
            return True
    return False


def _judge_image(
    container: workloads.ContainerImage,
    classified: references.Classification,
    subject: str,
    policy: Policy,
    environment: str | None,
    lookups: Mapping[Subject, PromotionStatus],
) -> tuple[Finding | None, ImageOutcome, str | None]:
    where = {"field_path": container.field_path, "container": container.container, "image": container.image}
    ref = classified.reference
    if ref is None:
        outcome = ImageOutcome(container.field_path, container.container, container.image)
        return (Finding(Reason.INVALID_REFERENCE, subject,
                        f'image "{container.image}" is not a valid reference: {classified.problem}',
                        short=f'"{container.image}" {classified.problem}', **where),
                outcome, None)
    exempt = bool(policy.exempt_images) and _exempt(policy, ref)
    outcome = ImageOutcome(container.field_path, container.container, container.image, ref.repository,
                           ref.digest or "", exempt=exempt)
    if exempt:
        return None, outcome, None
    if ref.digest is None:
        implicit = " (no tag: implicitly \"latest\")" if ref.implicit_latest else ""
        return (Finding(Reason.MUTABLE_TAG, subject,
                        f'image "{container.image}" is a mutable tag{implicit}; deploy by digest: '
                        f"{ref.written_name}@sha256:<digest>",
                        short=f'"{container.image}" is a mutable tag; use {ref.written_name}@sha256:<digest>',
                        **where),
                outcome, None)
    warning = None
    if ref.tag:
        warning = f'{container.field_path} "{container.container}": tag "{ref.tag}" is ignored, the digest is pulled'
    if environment is None:
        return None, outcome, warning
    status = lookups.get((ref.repository, ref.digest), PromotionStatus(Promotion.NOT_PROMOTED))
    if status.state is Promotion.PROMOTED:
        return None, replace(outcome, record_ids=status.record_ids), warning
    pinned = f"{ref.written_name}@{ref.digest}"
    if status.state is Promotion.UNAVAILABLE:
        return (Finding(Reason.STORE_UNAVAILABLE, subject,
                        f"{pinned}: the attestation store did not answer ({status.detail}); "
                        "retry, or ask the cluster operator", short=f"store did not answer ({status.detail})",
                        **where), outcome, warning)
    if status.state is Promotion.UNTRUSTED:
        return (Finding(Reason.UNTRUSTED_RECORD, subject,
                        f'{pinned} has a promotion record for environment "{environment}" that cannot be '
                        f"trusted: {status.detail}", short=f"{ref.digest[:19]}… record for {environment} not trusted",
                        **where), outcome, warning)
    promoted = ", ".join(status.promoted_to) or "none"
    if status.detail == "revoked":
        promoted += f"; revoked from {environment}"
    return (Finding(Reason.NOT_PROMOTED, subject,
                    f'{pinned} has no promotion record for environment "{environment}" (promoted to: '
                    f"{promoted}). Promote it: promotion-gate promote {pinned} --to {environment}",
                    short=f"{ref.digest[:19]}… not promoted to {environment}; promotion-gate promote … --to "
                          f"{environment}", **where),
            outcome, warning)

