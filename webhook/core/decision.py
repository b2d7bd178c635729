"""The policy core: (request, policy, environment, record view) -> verdict. No I/O of its own.

Everything this function needs from the outside world is passed in: the namespace's environment
(already resolved) and a :class:`~webhook.core.promotion.RecordView` that answers promotion questions.
That makes the rules testable as tables and lets the HTTP layer, ``check`` and the benchmarks share
one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from webhook.core import findings as words
from webhook.core import references, workloads
from webhook.core.findings import Finding, Reason, warning_line
from webhook.core.policy import Mode, Policy, Unmapped
from webhook.core.promotion import NOT_PROMOTED, Lookup, Promotion, RecordView
from webhook.core.review import AdmissionRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageOutcome:
    field_path: str
    container: str
    image: str
    repository: str = ""
    digest: str = ""
    record_ids: tuple[str, ...] = ()
    exempt: bool = False


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, slots=True)
class BreakGlass:
    """Who is asking, whether they may break glass, and whether this request sets the annotation."""

    username: str = ""
    permitted: bool = False
    sets_annotation: bool = False


# Tags whose promoted digest one request asks for; more (a Pod of dozens of tagged images) get the plain denial.
MAX_TAG_QUESTIONS = 16

# The offline check does not know who will apply a manifest: it reports every finding.
OFFLINE = BreakGlass(permitted=True)


def _allowed(reason: str, **extra: object) -> Verdict:
    return Verdict(allowed=True, skipped=reason, **extra)  # type: ignore[arg-type]


def decide(
    request: AdmissionRequest,
    policy: Policy,
    environment: str | None,
    records: RecordView,
) -> Verdict:
    """Judge one admission request. Raises ``WorkloadShapeError`` for objects of the wrong shape."""
    if request.operation in ("DELETE", "CONNECT"):
        return _allowed(f"{request.operation} is never blocked")
    if request.object is None:  # a DELETE or CONNECT; the review refuses CREATE and UPDATE without one
        return _allowed("no object")
    kind = policy.workload_kind(request.group, request.kind)
    if kind is None:
        group_kind = f"{request.group}/{request.kind}" if request.group else request.kind
        return _allowed(f"{group_kind} is not a workload kind")
    workload = workloads.extract(request.object, kind, namespace=request.namespace, name=request.name)
    subject = workload.display_name
    mode = policy.mode_for(environment)
    if request.namespace in policy.exempt_namespaces:
        return Verdict(
            allowed=True, notes=(str(Reason.EXEMPT),), subject=subject, mode=mode, environment=environment,
            skipped=f"namespace {request.namespace} is exempt",
        )

    if (kind.kind != "Pod" and workload.controlled and request.user.username in policy.break_glass_controllers
            and request.operation == "CREATE"):
        # A Deployment's ReplicaSet, a CronJob's Job: made by a trusted controller for the workload that
        # owns it, which was judged when it was written. Its Pods are judged when they are created, so a
        # revoked digest stops them there, with a FailedCreate event on this object that names the reason.
        return _allowed(f"{kind.kind} created by {request.user.username} for the workload that owns it; its "
                        "Pods are judged", subject=subject, environment=environment, mode=mode)

    candidates = workload.images
    old = None
    if request.operation == "UPDATE" and request.old_object is not None:
        old = workloads.extract(request.old_object, kind, namespace=request.namespace, name=request.name)
        if old.deleting or workload.deleting:
            return _allowed("object is being deleted", subject=subject)
    # Adding, changing or moving the break-glass annotation, in any place it can live, is judged in
    # full: it is what the workload and the objects its controllers create will be admitted by.
    # Removing it is not: taking the exception back must always be possible.
    sets_break_glass = workload.sets_break_glass_over(old)
    if old is not None and not sets_break_glass:
        # Only images the update introduces are judged: a scale-down, a label change or a finalizer
        # removal must never be blocked because of what is already running.
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
    return judge_workload(workload, candidates, policy, environment, records,
                          BreakGlass(user.username, permitted, sets_break_glass))


def judge_workload(
    workload: workloads.Workload,
    candidates: tuple[workloads.ContainerImage, ...],
    policy: Policy,
    environment: str | None,
    records: RecordView,
    break_glass: BreakGlass = OFFLINE,
) -> Verdict:
    """Judge the given containers of one workload (shared by admission and the offline check)."""
    subject = workload.display_name
    found, gated = _namespace_findings(workload, policy, environment)
    outcomes, image_findings, warnings = _judge_images(workload, candidates, policy,
                                                       environment if gated else None, records)
    notes = (str(Reason.EXEMPT),) if any(o.exempt for o in outcomes) else ()
    verdict = Verdict(allowed=True, mode=policy.mode_for(environment), environment=environment, subject=subject,
                      images=outcomes, notes=notes, warnings=warnings)
    return _conclude(verdict, (*found, *image_findings), workload.break_glass, break_glass)


def _namespace_findings(workload: workloads.Workload, policy: Policy,
                        environment: str | None) -> tuple[tuple[Finding, ...], bool]:
    """Findings about the namespace's environment, and whether promotion records are required."""
    if not policy.environments:
        # A policy without environments is digest-only everywhere, whatever the namespaces are labelled.
        return (), False
    subject = workload.display_name
    if environment is None:
        if policy.unmapped is Unmapped.DENY:
            return (words.unlabelled_namespace(subject, workload.namespace, policy.environment_names),), False
        return (), False
    if policy.environment(environment) is None:
        return (words.undefined_environment(subject, workload.namespace, environment,
                                            policy.environment_names),), False
    return (), True


def _judge_images(
    workload: workloads.Workload,
    candidates: tuple[workloads.ContainerImage, ...],
    policy: Policy,
    environment: str | None,
    records: RecordView,
) -> tuple[tuple[ImageOutcome, ...], tuple[Finding, ...], tuple[str, ...]]:
    """One outcome per container; findings and warnings for those that fail. ``environment``: gated."""
    classified = [(container, references.classify(container.image)) for container in candidates]
    lookups = Lookup({})
    if environment is not None:
        judged = [c.reference for _, c in classified if c.reference is not None and not _exempt(policy, c.reference)]
        pinned = list(dict.fromkeys((r.repository, r.digest) for r in judged if r.digest is not None))
        # A tag's promoted digest is the fix its denial offers; asked in the same round trip, never waited
        # for beyond the store's deadline (without an answer the plain mutable-tag denial stands).
        tags = list(dict.fromkeys((r.repository, r.tag or "latest") for r in judged if r.digest is None))
        if pinned or tags:
            lookups = records.lookup(pinned, tags[:MAX_TAG_QUESTIONS], environment)  # one round trip
    outcomes: list[ImageOutcome] = []
    found: list[Finding] = []
    warnings: list[str] = []
    for container, classification in classified:
        outcome, finding, warning = _judge_image(workload.display_name, container, classification, policy,
                                                 environment, lookups)
        outcomes.append(outcome)
        if finding:
            found.append(finding)
        if warning:
            warnings.append(warning)
    return tuple(outcomes), tuple(found), tuple(warnings)


def _conclude(verdict: Verdict, found: tuple[Finding, ...], annotation: str | None,
              break_glass: BreakGlass) -> Verdict:
    """Apply the environment's mode and the break-glass annotation to the findings."""
    subject, notes = verdict.subject, verdict.notes
    if not found:
        if break_glass.sets_annotation and not break_glass.permitted and verdict.mode is Mode.ENFORCE:
            # Controllers carry the annotation to every Pod the workload creates later, when its digest
            # may have been revoked: only people allowed to break glass may set it, findings or not.
            why = words.break_glass_not_allowed(break_glass.username)
            return replace(verdict, allowed=False, break_glass_refused=why, notes=(*notes, str(Reason.BREAK_GLASS)),
                           message=words.break_glass_setting_refused(subject, why))
        return verdict
    verdict = replace(verdict, findings=found)
    if verdict.mode is Mode.AUDIT:
        return replace(verdict, notes=(*notes, str(Reason.WARN_ONLY)))
    if verdict.mode is Mode.WARN:
        return replace(verdict, notes=(*notes, str(Reason.WARN_ONLY)),
                       warnings=(*(warning_line(f) for f in found), *verdict.warnings))
    lines = [f.line for f in found]
    if annotation is None:
        return replace(verdict, allowed=False, message="\n".join(lines))
    reason = annotation.strip()
    if break_glass.permitted and reason:
        note = words.break_glass_admitted(subject, len(found), break_glass.username, reason)
        return replace(verdict, notes=(*notes, str(Reason.BREAK_GLASS)), break_glass_reason=reason,
                       warnings=(note, *(warning_line(f) for f in found), *verdict.warnings))
    why = (words.break_glass_not_allowed(break_glass.username) if not break_glass.permitted
           else words.BREAK_GLASS_NEEDS_REASON)
    lines.append(words.break_glass_ignored(why))
    return replace(verdict, allowed=False, message="\n".join(lines), break_glass_refused=why)


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
    subject: str,
    container: workloads.ContainerImage,
    classified: references.Classification,
    policy: Policy,
    environment: str | None,
    lookups: Lookup,
) -> tuple[ImageOutcome, Finding | None, str | None]:
    ref = classified.reference
    if ref is None:
        outcome = ImageOutcome(field_path=container.field_path, container=container.container, image=container.image)
        return outcome, words.invalid_reference(subject, container, classified.problem or ""), None
    exempt = bool(policy.exempt_images) and _exempt(policy, ref)
    # Built whole rather than with dataclasses.replace, which costs several times a construction: this
    # runs for every container of every request.
    outcome = ImageOutcome(field_path=container.field_path, container=container.container, image=container.image,
                           repository=ref.repository, digest=ref.digest or "", exempt=exempt)
    if exempt:
        return outcome, None, None
    if ref.digest is None:
        answer = lookups.tags.get((ref.repository, ref.tag or "latest"))
        promoted = (environment, answer.digest) if environment is not None and answer and answer.digest else None
        return outcome, words.mutable_tag(subject, container, ref, promoted), None
    warning = words.tag_ignored(container, ref.tag) if ref.tag else None
    if environment is None:
        return outcome, None, warning
    status = lookups.statuses.get((ref.repository, ref.digest), NOT_PROMOTED)
    if status.state is Promotion.PROMOTED:
        counted = ImageOutcome(field_path=outcome.field_path, container=outcome.container, image=outcome.image,
                               repository=outcome.repository, digest=outcome.digest, record_ids=status.record_ids)
        return counted, None, warning
    if status.state is Promotion.UNAVAILABLE:
        return outcome, words.store_unavailable(subject, container, ref, status.detail), warning
    if status.state is Promotion.UNTRUSTED:
        return outcome, words.untrusted_record(subject, container, ref, environment, status.detail), warning
    return (outcome, words.not_promoted(subject, container, ref, environment, status.promoted_to,
                                        status.revoked_from), warning)
