"""The operator's live answer to "what runs that is not (or no longer) promoted?".

A :class:`~webhook.cluster_listing.ClusterCache` keeps every Pod, workload and namespace by
list+watch. One thread rescans from that cache — no API request per scan — and publishes the result:

- **at once** when the store's record set changes (``records_version``, one index-only query every
  ``record_poll`` seconds: a promotion or a revocation) or the policy file changes;
- after cluster changes (a rollout, a new Pod), at most once per ``settle`` seconds;
- and every ``interval`` seconds regardless.

Each scan writes a ``PolicyReport`` per namespace only when what it says changed, posts one Event on
each workload a revocation made non-compliant (once per workload, container and revocation), and
updates the gauge. It never deletes, evicts or changes a workload. Any failure (store, API server,
a report write) is logged and retried by the next scan; the loop itself never ends on an error.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webhook import policy_file, policy_reports, scan
from webhook.cluster_access import KubeAccess
from webhook.cluster_listing import ClusterCache, Lister, now_rfc3339
from webhook.core import references
from webhook.core.policy import Policy
from webhook.core.promotion import StoredRecord
from webhook.scan_metrics import ScanMetrics
from webhook.scan_records import BatchedRecordView
from webhook.store import SqlStore, StoreError

log = logging.getLogger("promotion_gate.scan")

EVENT_REASON = "DigestRevoked"
EVENT_COMPONENT = "promotion-gate-operator"
MAX_EVENT_MESSAGE = 1024
CRD_RECHECK_SECONDS = 600.0


@dataclass(frozen=True)
class ScanSettings:
    interval: float = 300.0  # a full rescan at least this often
    settle: float = 5.0  # after cluster changes, at most one rescan per this many seconds
    record_poll: float = 2.0  # how often the store's record version and the policy file are checked
    policy_path: Path | None = None  # re-read when it changes (a ConfigMap update)
    policy_reports: bool = True
    events: bool = True
    max_events: int = 50  # Events per scan; the rest are logged
    metrics_address: tuple[str, int] | None = None
    page_size: int = 500
    request_timeout: float = 30.0


# --- words and objects (pure) ---------------------------------------------------------------------------


def revocation_message(found: scan.ScanFinding, revocation: StoredRecord | None) -> str:
    finding = found.finding
    reference = references.classify(finding.image).reference
    pinned = reference.pinned_form if reference is not None else finding.image
    who = ""
    if revocation is not None:
        why = revocation.record.reason[:200]
        who = f" by {revocation.record.by}" + (f" ({why})" if why else "")
    where = (f"still runs in {found.pod_count} pod(s) of {found.workload.display_name}" if found.pod_count else
             f"is still in the template of {found.workload.display_name} (no Pod runs it now)")
    message = (f'{pinned} was revoked from "{found.environment}"{who} and {where}, container "{finding.container}". '
               "Promotion Gate reports it and stops nothing: roll out a promoted digest, or see "
               "docs/revoked-digest.md")
    return message[:MAX_EVENT_MESSAGE]


def event_key(found: scan.ScanFinding, revocation: StoredRecord | None) -> str:
    """Names the Event: the same workload, container, image and revocation always give the same name."""
    identity = "\0".join((found.workload.uid or found.workload.display_name, found.finding.container,
                          found.finding.image, found.environment or "", revocation.id if revocation else ""))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def event_body(found: scan.ScanFinding, revocation: StoredRecord | None, now: str, instance: str) -> dict[str, Any]:
    workload = found.workload
    involved = {"apiVersion": workload.api_version, "kind": workload.kind, "name": workload.name,
                "namespace": workload.namespace, "uid": workload.uid}
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{workload.name[:200]}.{event_key(found, revocation)}", "namespace": found.namespace,
                     "labels": dict(policy_reports.MANAGED_BY)},
        "involvedObject": {k: v for k, v in involved.items() if v},
        "reason": EVENT_REASON, "type": "Warning", "message": revocation_message(found, revocation),
        "source": {"component": EVENT_COMPONENT}, "reportingComponent": "promotion-gate.io/operator",
        "reportingInstance": instance, "action": "Scan",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


def revoked_findings(report: scan.ScanReport) -> list[scan.ScanFinding]:
    """Findings a revocation causes: workloads that run the image, or whose template still names it."""
    return [f for f in report.findings if f.revoked]


# --- the loop -------------------------------------------------------------------------------------------


class PolicySource:
    """The policy file, read again when its content changes; a broken edit keeps the last good policy."""

    def __init__(self, policy: Policy, path: Path | None) -> None:
        self.policy = policy
        self._path = path
        self._seen = ""
        self._seen = self._digest()

    def _digest(self) -> str:
        if self._path is None:
            return ""
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:  # mid-update (the kubelet swaps a ConfigMap's files): as it was
            return self._seen

    def changed(self) -> bool:
        digest = self._digest()
        if self._path is None or digest == self._seen:
            return False
        self._seen = digest
        try:
            self.policy = policy_file.load(self._path)
        except policy_file.PolicyError as exc:
            log.error("the policy file changed but does not load (%s); scanning with the previous policy", exc)
            return False
        log.info("the policy file changed; rescanning")
        return True


class Scanner:
    def __init__(self, settings: ScanSettings, policy: Policy, store: SqlStore, kube: KubeAccess,
                 metrics: ScanMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ScanMetrics()
        self._policy = PolicySource(policy, settings.policy_path)
        self._store = store
        self._kube = kube
        self._records = BatchedRecordView(store, policy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scanner", daemon=True)
        self._cache: ClusterCache | None = None
        self._api: Any = None
        self._published: dict[str, str] = {}  # namespace -> fingerprint of the report it has now
        self._stale_listed = False
        self._crd_missing_since: float | None = None
        self._revoked_seen: set[str] = set()
        self._instance = socket.gethostname()
        self.last_report: scan.ScanReport | None = None
        self._last_summary = ""

    # lifecycle

    def start(self) -> None:
        """Raises ``OSError`` when the metrics address cannot be bound (before anything else is started)."""
        if self.settings.metrics_address is not None:
            from prometheus_client import start_http_server

            host, port = self.settings.metrics_address
            start_http_server(port, addr=host, registry=self.metrics.registry)
            log.info("scan metrics on http://%s:%d/metrics", host, port)
        api_client = self._kube.api_client()
        self._api = api_client
        lister = Lister(api_client, page_size=self.settings.page_size, timeout=self.settings.request_timeout)
        self._cache = ClusterCache(lister).start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._cache is not None:
            self._cache.stop()
        self._thread.join(timeout)
        if self._api is not None:
            self._api.close()

    # the loop

    def _run(self) -> None:
        assert self._cache is not None
        cache = self._cache
        last_scan = 0.0
        scanned_changes = -1
        version: int | None = None
        wanted = "start"
        while not self._stop.is_set():
            try:
                current = self._store.records_version()
                if version is not None and current != version:
                    wanted = wanted or f"the record set changed (version {version} -> {current})"
                version = current
            except StoreError as exc:
                log.warning("cannot read the store's record version: %s", exc)
            if self._policy.changed():
                self._records = BatchedRecordView(self._store, self._policy.policy)
                wanted = wanted or "the policy changed"
            now = time.monotonic()
            if not wanted and cache.changes != scanned_changes and now - last_scan >= self.settings.settle:
                wanted = "the cluster changed"
            if not wanted and now - last_scan >= self.settings.interval:
                wanted = "interval"
            if wanted and cache.synced:
                changes = cache.changes
                if self._scan_once(wanted):
                    scanned_changes = changes
                last_scan, wanted = time.monotonic(), ""
            elif wanted and not cache.synced and cache.errors():
                log.debug("waiting for the caches: %s", "; ".join(cache.errors()))
            self._stop.wait(min(self.settings.record_poll, self.settings.settle))

    def _scan_once(self, why: str) -> bool:
        assert self._cache is not None
        started = time.monotonic()
        inventory = self._cache.snapshot()
        try:
            report = scan.run(inventory, self._policy.policy, self._records, observed_at=now_rfc3339())
        except StoreError as exc:
            self.metrics.scans.labels(result="error").inc()
            log.warning("scan skipped: the store failed (%s); trying again shortly", exc)
            return False
        except Exception:
            self.metrics.scans.labels(result="error").inc()
            log.exception("scan failed; trying again shortly")
            return False
        self.last_report = report
        self.metrics.scanned(report, time.time(), time.monotonic() - started)
        summary = scan.summary_line(report)
        # A busy cluster rescans every few seconds: say it when the answer changes, not every time.
        log.log(logging.INFO if summary != self._last_summary else logging.DEBUG, "scan (%s): %s", why, summary)
        self._last_summary = summary
        for note in report.notes[:20]:
            log.info("scan note: %s", note)
        try:
            if self.settings.policy_reports:
                self._publish(report)
            if self.settings.events:
                self._notify(report)
        except Exception:  # a write that fails must not stop the loop; the next scan writes again
            log.exception("publishing the scan failed; the next scan tries again")
        return True

    # PolicyReports

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api)

    def _crd_missing(self, exc: Any) -> bool:
        body = str(getattr(exc, "body", "") or "")
        return getattr(exc, "status", 0) == 404 and "the server could not find the requested resource" in body

    def _publish(self, report: scan.ScanReport) -> None:
        from kubernetes.client.exceptions import ApiException

        if self._crd_missing_since is not None and time.monotonic() - self._crd_missing_since < CRD_RECHECK_SECONDS:
            return
        reports = policy_reports.build(report)
        if not self._stale_listed:
            try:
                for namespace in self._existing_reports():
                    self._published.setdefault(namespace, "unknown")
                self._stale_listed = True
            except ApiException as exc:
                if self._crd_missing(exc):
                    self._missing_crd()
                    return
                log.warning("cannot list existing PolicyReports (%s %s); stale ones stay until the next try",
                            exc.status, exc.reason)
        for namespace in set(self._published) - set(reports):
            # Its workloads are gone, or the policy made it exempt: it reports nothing any more.
            reports[namespace] = policy_reports.empty(namespace)
        timestamp = int(time.time())
        for namespace, built in sorted(reports.items()):
            if namespace not in report.namespaces and namespace not in report.exempt:
                self._published.pop(namespace, None)  # deleted namespaces take their report with them
                continue
            if self._published.get(namespace) == built.fingerprint:
                continue
            if self._write(built, timestamp):
                self._published[namespace] = built.fingerprint
            elif self._crd_missing_since is not None:
                return

    def _existing_reports(self) -> Iterable[str]:
        token: str | None = None
        while True:
            page = self._custom().list_cluster_custom_object(
                policy_reports.GROUP, policy_reports.VERSION, policy_reports.PLURAL,
                label_selector=policy_reports.MANAGED_BY_SELECTOR, limit=500, _continue=token,
                _request_timeout=self.settings.request_timeout)
            for item in page.get("items", []):
                metadata = item.get("metadata", {})
                if metadata.get("name") == policy_reports.REPORT_NAME and metadata.get("namespace"):
                    yield str(metadata["namespace"])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    def _missing_crd(self) -> None:
        self._crd_missing_since = time.monotonic()
        log.error("the PolicyReport CRD (policyreports.wgpolicyk8s.io, v1alpha2) is not installed: reports are not "
                  "published (install it: kubectl apply -f charts/promotion-gate/crds/policyreport.yaml; Helm does "
                  "unless --skip-crds); checking again in %.0f minutes", CRD_RECHECK_SECONDS / 60)

    def _write(self, built: policy_reports.NamespaceReport, timestamp: int) -> bool:
        from kubernetes.client.exceptions import ApiException

        custom = self._custom()
        args = (policy_reports.GROUP, policy_reports.VERSION, built.namespace, policy_reports.PLURAL)
        try:
            custom.patch_namespaced_custom_object(*args, policy_reports.REPORT_NAME,
                                                  built.body(timestamp, patch=True),
                                                  _request_timeout=self.settings.request_timeout)
            self.metrics.report_writes.labels(result="patched").inc()
            return True
        except ApiException as exc:
            if exc.status != 404:
                return self._write_failed(built, exc)
            if self._crd_missing(exc):
                self._missing_crd()
                return False
        try:
            custom.create_namespaced_custom_object(*args, built.body(timestamp),
                                                   _request_timeout=self.settings.request_timeout)
            self.metrics.report_writes.labels(result="created").inc()
            if built.omitted:
                log.warning("PolicyReport %s/%s leaves out %d result(s) to stay under %d bytes", built.namespace,
                            policy_reports.REPORT_NAME, built.omitted, policy_reports.MAX_REPORT_BYTES)
            return True
        except ApiException as exc:
            return self._write_failed(built, exc)

    def _write_failed(self, built: policy_reports.NamespaceReport, exc: Any) -> bool:
        self.metrics.report_writes.labels(result="failed").inc()
        log.warning("cannot write PolicyReport %s/%s: %s %s", built.namespace, policy_reports.REPORT_NAME,
                    getattr(exc, "status", ""), getattr(exc, "reason", exc))
        return False

    # Events

    def _notify(self, report: scan.ScanReport) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core: Any = client.CoreV1Api(self._api)  # given plain dicts, like every Kubernetes call here
        handled: set[str] = set()  # keys whose Event exists: only these are not posted again
        posted = skipped = 0
        now = now_rfc3339()
        for found in revoked_findings(report):
            reference = references.classify(found.finding.image).reference
            revocation = None
            if reference is not None and reference.digest is not None and found.environment:
                revocation = self._records.revocation((reference.repository, reference.digest), found.environment)
            key = event_key(found, revocation)
            if key in self._revoked_seen:
                handled.add(key)
                continue
            if posted >= self.settings.max_events:
                skipped += 1
                continue
            try:
                core.create_namespaced_event(found.namespace, event_body(found, revocation, now, self._instance),
                                             _request_timeout=self.settings.request_timeout)
            except ApiException as exc:
                if exc.status == 409:  # posted before a restart: the same name, the same news
                    handled.add(key)
                    continue
                self.metrics.events.labels(result="failed").inc()
                log.warning("cannot post an Event on %s: %s %s", found.workload.display_name, exc.status, exc.reason)
                continue
            posted += 1
            handled.add(key)
            self.metrics.events.labels(result="posted").inc()
            log.warning("%s", revocation_message(found, revocation))
        if skipped:
            log.warning("%d more workload(s) run a revoked digest; their Events come with the next scans", skipped)
        self._revoked_seen = handled
