"""The offline check: the admission policy run over manifests before they are applied."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from webhook import manifests
from webhook.core import decision, workloads
from webhook.core.findings import Finding
from webhook.core.policy import Policy, Unmapped
from webhook.core.promotion import RecordView


@dataclass
class CheckReport:
    findings: list[tuple[str, Finding]] = field(default_factory=list)  # (document location, finding)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # documents read but not manifests (templates, patches)
    checked: int = 0  # workloads judged
    denied: int = 0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 2
        return 1 if self.denied else 0


def run(paths: list[str], policy: Policy, environment: str | None, records: RecordView) -> CheckReport:
    report = CheckReport()
    if environment is None:
        # Without a target environment only the digest rule can be checked offline.
        policy = replace(policy, unmapped=Unmapped.DIGEST_ONLY)
    for path in manifests.expand(paths):
        try:
            for doc in manifests.read(path):
                if isinstance(doc, manifests.Unreadable):
                    report.errors.append(str(doc))
                    continue
                if isinstance(doc, manifests.NotAManifest):
                    report.skipped.append(str(doc))
                    continue
                kind = _kind_of(doc.body, policy)
                if kind is None:
                    continue
                try:
                    workload = workloads.extract(doc.body, kind)
                except workloads.WorkloadShapeError as exc:
                    report.errors.append(f"{doc.where}: {exc}")
                    continue
                report.checked += 1
                # Who applies the manifest is unknown offline: every finding is reported.
                verdict = decision.judge_workload(workload, workload.images, policy, environment, records,
                                                  decision.OFFLINE)
                # Offline, warn/audit modes do not soften the answer: the check says what enforce would do.
                if verdict.findings:
                    report.denied += 1
                for finding in verdict.findings:
                    report.findings.append((doc.where, finding))
                for warning in verdict.warnings:
                    if not warning.startswith("["):
                        report.warnings.append((doc.where, warning))
        except manifests.ManifestError as exc:
            report.errors.append(str(exc))
    return report


def _kind_of(body: dict[str, object], policy: Policy) -> workloads.WorkloadKind | None:
    """The workload kind of a manifest, by its apiVersion's group and its kind, as admission matches it."""
    group, kind = workloads.group_of(body.get("apiVersion")), body.get("kind")
    if group is None or not isinstance(kind, str):
        return None
    return policy.workload_kind(group, kind)
