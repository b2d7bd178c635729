"""A scan as ``PolicyReport`` objects (``wgpolicyk8s.io/v1alpha2``), one per namespace.

The Kubernetes Policy working group's report format, which Kyverno, Kubewarden and Trivy write too,
so ``kubectl get policyreport`` and the dashboards built on it (Policy Reporter, …) show Promotion
Gate's answer next to theirs. Each namespace gets one report named ``promotion-gate``:

- one ``fail`` result per finding (workload and container), its message the admission line, its
  ``rule`` the reason code, its ``properties`` the container, image, Pods and whether a revocation
  is the reason; ``store-unavailable`` and ``internal-error`` are ``error`` results;
- one ``pass`` result per workload without findings;
- ``summary`` counts every result, even when the report had to leave some out to stay under
  :data:`MAX_REPORT_BYTES` (failures are kept first; the annotation
  ``promotion-gate.io/omitted-results`` says how many were left out).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from webhook.core.findings import Reason
from webhook.running import ObjectRef
from webhook.scan import ScanFinding, ScanReport, WorkloadResult

GROUP, VERSION, PLURAL, KIND = "wgpolicyk8s.io", "v1alpha2", "policyreports", "PolicyReport"
REPORT_NAME = "promotion-gate"
SOURCE = POLICY = "promotion-gate"
PASS_RULE = "promoted-digests"
CATEGORY = "Supply chain"
MANAGED_BY = {"app.kubernetes.io/managed-by": "promotion-gate"}
MANAGED_BY_SELECTOR = "app.kubernetes.io/managed-by=promotion-gate"
OMITTED_ANNOTATION = "promotion-gate.io/omitted-results"
# etcd refuses objects over 1.5 MiB; stay well below, whatever the names and images in a namespace.
MAX_REPORT_BYTES = 800_000

SEVERITY = {
    Reason.NOT_PROMOTED: "high", Reason.UNTRUSTED_RECORD: "high",
    Reason.MUTABLE_TAG: "medium", Reason.INVALID_REFERENCE: "medium", Reason.NO_ENVIRONMENT: "medium",
    Reason.STORE_UNAVAILABLE: "info", Reason.INTERNAL_ERROR: "info",
}
ERRORS = frozenset({Reason.STORE_UNAVAILABLE, Reason.INTERNAL_ERROR})  # the gate could not tell: not a failure


@dataclass(frozen=True)
class NamespaceReport:
    namespace: str
    summary: dict[str, int]
    results: list[dict[str, Any]]
    omitted: int = 0

    @property
    def fingerprint(self) -> str:
        """What the report says, without when it was said: unchanged reports are not written again."""
        return hashlib.sha256(orjson.dumps([self.summary, self.results, self.omitted],
                                           option=orjson.OPT_SORT_KEYS)).hexdigest()

    def body(self, timestamp: int, *, patch: bool = False) -> dict[str, Any]:
        """The whole object to create, or (``patch``) a JSON merge patch that replaces what it says."""
        stamped = [{**result, "timestamp": {"seconds": timestamp, "nanos": 0}} for result in self.results]
        omitted = str(self.omitted) if self.omitted else None
        annotations = {OMITTED_ANNOTATION: omitted} if patch or omitted else {}
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": REPORT_NAME, "namespace": self.namespace, "labels": dict(MANAGED_BY),
                         "annotations": annotations},
            "summary": self.summary,
            "results": stamped,
        }


def _resource(ref: ObjectRef) -> dict[str, str]:
    resource = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "namespace": ref.namespace,
                "uid": ref.uid}
    return {k: v for k, v in resource.items() if v}


def _fail(found: ScanFinding) -> dict[str, Any]:
    finding = found.finding
    properties = {"container": finding.container, "image": finding.image, "field": finding.field_path,
                  "environment": found.environment or "", "revoked": "true" if found.revoked else "false",
                  "runningPods": str(found.pod_count), "since": found.since,
                  "inTemplate": "true" if found.in_template else "false", "breakGlass": found.break_glass or ""}
    return {
        "source": SOURCE, "policy": POLICY, "rule": str(finding.reason), "category": CATEGORY,
        "result": "error" if finding.reason in ERRORS else "fail",
        "severity": SEVERITY.get(finding.reason, "medium"), "scored": True,
        "message": finding.line, "resources": [_resource(found.workload)],
        "properties": {k: v for k, v in properties.items() if v},
    }


def pass_message(result: WorkloadResult) -> str:
    where = f' and promoted to "{result.environment}"' if result.environment else ""
    return f"every image of {result.workload.display_name} is pinned by digest{where}"


def _pass(result: WorkloadResult) -> dict[str, Any]:
    return {"source": SOURCE, "policy": POLICY, "rule": PASS_RULE, "category": CATEGORY, "result": "pass",
            "severity": "info", "scored": True, "message": pass_message(result),
            "resources": [_resource(result.workload)],
            "properties": {"environment": result.environment or "", "runningPods": str(len(result.pods))}}


def build(report: ScanReport) -> dict[str, NamespaceReport]:
    """One report per judged namespace that has workloads."""
    by_namespace: dict[str, list[WorkloadResult]] = {}
    for result in report.workloads.values():
        by_namespace.setdefault(result.workload.namespace or "", []).append(result)
    built: dict[str, NamespaceReport] = {}
    for namespace, results in sorted(by_namespace.items()):
        if namespace not in report.namespaces:
            continue
        ordered = sorted(results, key=lambda r: (r.workload.kind, r.workload.name))
        failing = [_fail(f) for r in ordered for f in sorted(
            r.findings.values(), key=lambda f: (f.finding.field_path, f.finding.container, str(f.reason)))]
        passing = [_pass(r) for r in ordered if r.compliant]
        built[namespace] = bounded(namespace, [*failing, *passing])
    return built


def empty(namespace: str) -> NamespaceReport:
    """What a namespace whose workloads are all gone reports: nothing, and nothing failing."""
    return bounded(namespace, [])


def bounded(namespace: str, results: list[dict[str, Any]]) -> NamespaceReport:
    counts: Counter[str] = Counter(r["result"] for r in results)
    summary = {key: counts.get(key, 0) for key in ("pass", "fail", "warn", "error", "skip")}
    kept: list[dict[str, Any]] = []
    size = 0
    for result in results:
        size += len(orjson.dumps(result)) + 64  # the timestamp and the separators
        if size > MAX_REPORT_BYTES:
            break
        kept.append(result)
    return NamespaceReport(namespace, summary, kept, len(results) - len(kept))
