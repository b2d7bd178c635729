"""Scanning what runs: every Pod and workload judged by the admission core, against today's records.

Admission judges what is created from now on; a scan judges what already runs, with the same core
(:func:`judge`, the one call into :func:`webhook.core.decision.judge_workload`), the same policy and
the same records, so a finding reads exactly like the denial a developer would get today:

- a running Pod is judged under the identity of the workload admission judged for it (its
  Deployment, StatefulSet, CronJob, …, see :func:`webhook.running.as_judged`);
- a workload's own template is judged when nothing listed controls it (a Deployment scaled to zero,
  a CronJob between runs: what will run next);
- findings are reported per workload — the top of the owner chain — and container, with the Pods
  that run the image, since when, and whether a revocation is the reason.

Nothing here stops or changes a workload: the result is a report. Judgements are memoised per
distinct (workload, images, break-glass) within a scan, so 10,000 Pods of 1,000 ReplicaSets are
judged 1,000 times, and every digest of the scan is looked up before judging starts (one batched
read per 500 digests with :class:`webhook.scan_records.BatchedRecordView`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from webhook.core import decision, references
from webhook.core.findings import Finding, Reason
from webhook.core.policy import Policy
from webhook.core.promotion import NOT_PROMOTED, Lookup, PromotionStatus, RecordView, Subject, TagSubject
from webhook.core.workloads import Workload
from webhook.running import Inventory, ObjectRef, Observed, Placement, as_judged, place

MAX_POD_NAMES = 20  # Pods named per finding; the count is always complete


def judge(workload: Workload, policy: Policy, environment: str | None, records: RecordView) -> decision.Verdict:
    """The one call into the admission core. Who applied the workload is unknown, so every finding counts."""
    return decision.judge_workload(workload, workload.images, policy, environment, records, decision.OFFLINE)


@runtime_checkable
class Prefetching(Protocol):
    def prefetch(self, subjects: Sequence[Subject]) -> int: ...


class RememberingView:
    """A record view that remembers what it answered, so a finding can tell a revocation from a gap."""

    def __init__(self, inner: RecordView) -> None:
        self._inner = inner
        self.answers: dict[tuple[Subject, str], PromotionStatus] = {}

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        answered = self._inner.lookup(subjects, tags, environment)
        for subject, status in answered.statuses.items():
            self.answers[(subject, environment)] = status
        return answered

    def status(self, image: str, environment: str | None) -> PromotionStatus:
        reference = references.classify(image).reference
        if reference is None or reference.digest is None or environment is None:
            return NOT_PROMOTED
        return self.answers.get(((reference.repository, reference.digest), environment), NOT_PROMOTED)


@dataclass
class ScanFinding:
    """One finding about one container of one workload, with the Pods that run it."""

    namespace: str
    workload: ObjectRef
    environment: str | None
    finding: Finding
    revoked: bool = False
    break_glass: str | None = None
    in_template: bool = False
    pod_count: int = 0
    pod_names: list[str] = field(default_factory=list)
    since: str = ""

    @property
    def reason(self) -> Reason:
        return self.finding.reason

    def add_pod(self, name: str, since: str) -> None:
        self.pod_count += 1
        if len(self.pod_names) < MAX_POD_NAMES:
            self.pod_names.append(name)
        if since and (not self.since or since < self.since):
            self.since = since


@dataclass
class WorkloadResult:
    """A top workload (the one people know: Deployment, CronJob, a bare Pod) and what the scan found."""

    workload: ObjectRef
    environment: str | None
    findings: dict[tuple[str, str, str], ScanFinding] = field(default_factory=dict)  # (container, image, reason)
    pods: set[str] = field(default_factory=set)
    listed: bool = True

    @property
    def compliant(self) -> bool:
        return not self.findings


GaugeKey = tuple[str, str, str, str]  # namespace, environment, reason, revoked ("true"/"false")


@dataclass
class ScanReport:
    observed_at: str
    namespaces: dict[str, str | None] = field(default_factory=dict)  # judged namespace -> environment
    exempt: list[str] = field(default_factory=list)
    workloads: dict[ObjectRef, WorkloadResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pods: int = 0
    noncompliant_containers: Counter[GaugeKey] = field(default_factory=Counter)
    records_version: int | None = None
    api_requests: int = 0

    @property
    def findings(self) -> list[ScanFinding]:
        found = [f for result in self.workloads.values() for f in result.findings.values()]
        return sorted(found, key=lambda f: (f.namespace, f.workload.kind, f.workload.name, f.finding.field_path,
                                            f.finding.container, str(f.reason)))

    @property
    def noncompliant_workloads(self) -> int:
        return sum(1 for result in self.workloads.values() if not result.compliant)

    @property
    def compliant(self) -> bool:
        return self.noncompliant_workloads == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.compliant else 1


def environment_of(namespace: str, label: str | None, policy: Policy) -> str | None:
    """The label wins; a namespace without it falls back to the policy's static map (as admission does)."""
    return label or policy.namespace_environments.get(namespace)


@dataclass(frozen=True)
class _Task:
    """One object to judge, already placed in its owner chain."""

    obj: Observed
    top: ObjectRef
    top_listed: bool
    workload: Workload  # the containers under the identity admission judges
    environment: str | None


def run(inventory: Inventory, policy: Policy, records: RecordView, *, observed_at: str) -> ScanReport:
    """Judge every running Pod and every uncontrolled workload template of ``inventory``."""
    report = ScanReport(observed_at=observed_at, notes=list(inventory.notes), api_requests=inventory.requests)
    tasks, gone = _tasks(inventory, policy, report)
    for namespace, count in sorted(gone.items()):
        report.notes.append(f'namespace "{namespace}" no longer exists (deleted during the scan): {count} object(s) '
                            "in it were not judged")
    view = RememberingView(records)
    if isinstance(records, Prefetching):
        report.records_version = records.prefetch(_subjects(tasks, policy))
    verdicts: dict[tuple[Any, ...], decision.Verdict] = {}
    for task in tasks:
        workload = task.workload
        key = (workload.kind, workload.namespace, workload.name, workload.images, workload.break_glass)
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = judge(workload, policy, task.environment, view)
        _record(report, task, verdict, view, policy)
    for result in report.workloads.values():
        if not result.listed and result.pods:
            report.notes.append(f"{result.workload.display_name} (owner of {len(result.pods)} pod(s)) was not listed "
                                "(a kind Promotion Gate does not read, or already deleted): its Pods are judged, "
                                "its own template is not")
    return report


def _tasks(inventory: Inventory, policy: Policy, report: ScanReport) -> tuple[list[_Task], Counter[str]]:
    index = inventory.by_uid()
    tasks: list[_Task] = []
    gone: Counter[str] = Counter()
    for name, info in sorted(inventory.namespaces.items()):
        if name in policy.exempt_namespaces:
            report.exempt.append(name)
        else:
            report.namespaces[name] = environment_of(name, info.environment_label, policy)
    # The Pods of one ReplicaSet share its owner chain and, nearly always, its images: both are worked
    # out once per controller, not once per Pod.
    placements: dict[ObjectRef, Placement] = {}
    as_workloads: dict[tuple[Any, ...], Workload] = {}
    for obj in inventory.objects:
        namespace = obj.ref.namespace
        if namespace not in inventory.namespaces:
            gone[namespace] += 1
            continue
        if namespace in policy.exempt_namespaces or (obj.is_pod and not obj.runs):
            continue
        placement = placements.get(obj.controller) if obj.is_pod and obj.controller is not None else None
        if placement is None:
            placement = place(obj, index)
            if obj.is_pod and obj.controller is not None and placement.judged_as != obj.ref:
                placements[obj.controller] = placement
        if not obj.is_pod:
            if placement.judged_as != obj.ref:
                continue  # its controller's template (or its Pods) speak for it
            workload = obj.workload
        else:
            pod = obj.workload
            key = (placement.judged_as, pod.images, pod.break_glass, pod.deleting, pod.controlled)
            workload = as_workloads.get(key) or as_workloads.setdefault(key, _as_judged(obj, placement, index))
        tasks.append(_Task(obj, placement.top, placement.top_listed, workload, report.namespaces[namespace]))
    return tasks, gone


def _as_judged(pod: Observed, placement: Placement, index: Mapping[str, Observed]) -> Workload:
    workload = as_judged(pod, placement.judged_as)
    controller = index.get(placement.judged_as.uid) if placement.judged_as.uid else None
    if controller is not None and controller.workload.break_glass is not None:
        # The annotation on the workload admission judged stands for its Pods too.
        workload = replace(workload, break_glass_places=(("metadata", controller.workload.break_glass),))
    return workload


def _subjects(tasks: Sequence[_Task], policy: Policy) -> list[Subject]:
    subjects: set[Subject] = set()
    for task in tasks:
        if task.environment is None or policy.environment(task.environment) is None:
            continue
        for image in task.workload.images:
            reference = references.classify(image.image).reference
            if reference is not None and reference.digest is not None:
                subjects.add((reference.repository, reference.digest))
    return sorted(subjects)


def _record(report: ScanReport, task: _Task, verdict: decision.Verdict, view: RememberingView,
            policy: Policy) -> None:
    obj, namespace = task.obj, task.obj.ref.namespace
    result = report.workloads.get(task.top)
    if result is None:
        result = report.workloads[task.top] = WorkloadResult(task.top, task.environment, listed=task.top_listed)
    if obj.is_pod:
        result.pods.add(obj.ref.name)
        report.pods += 1
    gauge_environment = task.environment if task.environment in policy.environment_names else ""
    containers = [c.container for c in obj.workload.images]
    for finding in verdict.findings:
        revoked = (finding.reason is Reason.NOT_PROMOTED
                   and view.status(finding.image, task.environment).detail == "revoked")
        key = (finding.container, finding.image, str(finding.reason))
        found = result.findings.get(key)
        if found is None:
            found = result.findings[key] = ScanFinding(namespace, task.top, task.environment, finding, revoked,
                                                       verdict.break_glass_reason)
        if not obj.is_pod:
            found.in_template = True
            continue
        affected = [finding.container] if finding.container else containers
        found.add_pod(obj.ref.name, min((obj.since(c) for c in affected if obj.since(c)), default=""))
        report.noncompliant_containers[(namespace, gauge_environment or "", str(finding.reason),
                                        "true" if revoked else "false")] += len(affected)


# --- shapes ------------------------------------------------------------------------------------------


def finding_json(found: ScanFinding) -> dict[str, Any]:
    finding = found.finding
    return {
        "namespace": found.namespace,
        "workload": {"kind": found.workload.kind, "name": found.workload.name},
        "environment": found.environment,
        "container": finding.container,
        "image": finding.image,
        "field": finding.field_path,
        "reason": str(finding.reason),
        "line": finding.line,
        "revoked": found.revoked,
        "breakGlass": found.break_glass,
        "inTemplate": found.in_template,
        "pods": {"count": found.pod_count, "names": sorted(found.pod_names), "since": found.since or None},
    }


def report_json(report: ScanReport) -> dict[str, Any]:
    """``scan --output json``."""
    return {
        "observedAt": report.observed_at,
        "compliant": report.compliant,
        "namespaces": [{"name": name, "environment": env} for name, env in report.namespaces.items()],
        "exemptNamespaces": report.exempt,
        "workloads": len(report.workloads),
        "nonCompliantWorkloads": report.noncompliant_workloads,
        "pods": report.pods,
        "findings": [finding_json(f) for f in report.findings],
        "notes": report.notes,
    }


def detail_line(found: ScanFinding) -> str:
    """The second line under a finding: which Pods run it, whether the template still names it."""
    template = f"the {found.workload.kind}'s template" if found.workload.kind != "Pod" else "the Pod"
    if found.pod_count:
        names = ", ".join(sorted(found.pod_names))
        more = f" and {found.pod_count - len(found.pod_names)} more" if found.pod_count > len(found.pod_names) else ""
        text = f"running in {found.pod_count} pod(s) since {found.since or 'an unknown time'}: {names}{more}"
        if found.workload.kind != "Pod":
            text += "; still in its template" if found.in_template else ""
    else:
        text = f"no pod runs it now; {template} references it"
    if found.revoked:
        text += "; the digest was revoked"
    if found.break_glass:
        text += f"; break-glass: {found.break_glass}"
    return f"    {text}"


def summary_line(report: ScanReport) -> str:
    judged = (f"scanned {len(report.namespaces)} namespace(s): {len(report.workloads)} workload(s), "
              f"{report.pods} running pod(s)")
    if report.compliant:
        return f"{judged}; all compliant"
    return (f"{judged}; {report.noncompliant_workloads} workload(s) not compliant "
            f"({len(report.findings)} finding(s))")
