"""The operator's metrics: what the last scan found, and how scanning goes.

The gauge of non-compliant running containers is exported from the last scan's result alone (a
custom collector), never accumulated: a namespace that is deleted, or a reason that no longer
applies, disappears from the next scrape instead of lingering as a stale series. Its label values
are bounded by construction: ``namespace`` only names namespaces the scan found existing,
``environment`` only environments the policy defines (else ``""``), ``reason`` only the reason codes
of :class:`webhook.core.findings.Reason`, ``revoked`` only ``true``/``false``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from webhook.core.findings import Reason
from webhook.scan import ScanReport

KNOWN_REASONS = frozenset(str(r) for r in Reason)


class _LastScan(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: ScanReport | None = None
        self._finished = 0.0
        self._duration = 0.0

    def update(self, report: ScanReport, finished: float, duration: float) -> None:
        with self._lock:
            self._report, self._finished, self._duration = report, finished, duration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            report, finished, duration = self._report, self._finished, self._duration
        containers = GaugeMetricFamily(
            "promotion_gate_noncompliant_containers",
            "Running containers with a finding in the last scan, by namespace, environment, reason and whether a "
            "revocation is the reason (a container with two findings counts under each)",
            labels=["namespace", "environment", "reason", "revoked"])
        workloads = GaugeMetricFamily("promotion_gate_scan_workloads", "Workloads judged by the last scan",
                                      labels=["compliant"])
        if report is not None:
            for (namespace, environment, reason, revoked), count in sorted(report.noncompliant_containers.items()):
                if count and reason in KNOWN_REASONS and namespace in report.namespaces:
                    containers.add_metric([namespace, environment, reason, revoked], count)
            failing = report.noncompliant_workloads
            workloads.add_metric(["true"], len(report.workloads) - failing)
            workloads.add_metric(["false"], failing)
        yield containers
        yield workloads
        last = GaugeMetricFamily("promotion_gate_scan_last_success_timestamp_seconds",
                                 "When the last scan finished (Unix time); 0 before the first")
        last.add_metric([], finished)
        yield last
        took = GaugeMetricFamily("promotion_gate_scan_duration_seconds", "How long the last scan took")
        took.add_metric([], duration)
        yield took


class ScanMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._last = _LastScan()
        self.registry.register(self._last)
        self.scans = Counter("promotion_gate_scans", "Scans by outcome (ok, or error when the store or the caches "
                             "failed)", ["result"], registry=self.registry)
        self.report_writes = Counter("promotion_gate_policy_report_writes",
                                     "PolicyReport writes by outcome (created, patched, failed)", ["result"],
                                     registry=self.registry)
        self.events = Counter("promotion_gate_revocation_events", "Kubernetes Events posted on workloads that a "
                              "revocation made non-compliant", ["result"], registry=self.registry)
        for result in ("ok", "error"):
            self.scans.labels(result=result)

    def scanned(self, report: ScanReport, finished: float, duration: float) -> None:
        self._last.update(report, finished, duration)
        self.scans.labels(result="ok").inc()
