"""Prometheus metrics, one registry per app (no module-level globals).

With several worker processes (``serve --workers N``) every worker counts into files of one directory
(prometheus_client's multiprocess mode, :func:`share_between_workers`), and ``/metrics`` answers the
sum over all workers, whichever worker the scrape reaches (:meth:`Metrics.exposition`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_workers(directory: Path) -> None:
    """Count in ``directory``, shared by the worker processes forked after this call.

    Its count files are removed first: files left by an earlier run would be added to this one's
    counts. prometheus_client picks how it counts when a metric is made, from this environment
    variable; setting its value class here takes effect for every metric made afterwards, in this
    process and in the workers forked from it.
    """
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    for stale in directory.glob("*.db"):  # only prometheus_client's own files: the directory may be shared
        stale.unlink()
    os.environ[MULTIPROCESS_ENV] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def worker_stopped(pid: int) -> None:
    """Drop a dead worker's live gauges (open connections, readiness) from the sum."""
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.decisions = Counter(
            "promotion_gate_decisions", "Admission decisions, one per judged request and reason",
            ["environment", "mode", "allowed", "reason"], registry=r,
        )
        self.break_glass = Counter(
            "promotion_gate_break_glass", "Requests admitted through the break-glass annotation",
            ["environment", "namespace"], registry=r,
        )
        self.request_latency = Histogram(
            "promotion_gate_admission_duration_seconds", "Time to answer an AdmissionReview",
            ["result"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.malformed = Counter(
            "promotion_gate_malformed_requests", "Requests refused as malformed (4xx)", ["endpoint", "code"],
            registry=r,
        )
        self.store_errors = Counter(
            "promotion_gate_store_errors", "Attestation store lookups that failed or timed out", ["operation"],
            registry=r,
        )
        self.store_latency = Histogram(
            "promotion_gate_store_lookup_duration_seconds", "Time of one attestation store lookup",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.cache = Counter(
            "promotion_gate_verdict_cache",
            "Promotion verdicts per image digest: reused at the store's current record version (hit), evaluated "
            "from the records (miss), or served from the last version seen because the store missed its deadline "
            "(stale-served)",
            ["result"], registry=r,
        )
        self.audit_errors = Counter(
            "promotion_gate_audit_write_errors", "Audit events that could not be written to the store",
            registry=r,
        )
        self.audit_regressions = Counter(
            "promotion_gate_audit_chain_regressions",
            "Times this server found the audit chain shorter than what it had itself written: events or checkpoints "
            "were removed from the database",
            registry=r,
        )
        self.audit_latency = Histogram(
            "promotion_gate_audit_write_duration_seconds", "Time to append one audit event",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.records_ingested = Counter(
            "promotion_gate_records", "Promotion records submitted to the store", ["environment", "result"],
            registry=r,
        )
        self.connections_open = Gauge(
            "promotion_gate_connections_open", "Client connections open (summed over the worker processes)",
            registry=r, multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "promotion_gate_connections_closed",
            "Connections the server closed before answering them: a phase deadline passed (handshake-timeout, "
            "header-timeout, body-timeout, idle-timeout, write-timeout), TLS or HTTP errors, a body over the limit, "
            "or a connection bound (evicted: the oldest waiting connection made room; refused)",
            ["reason"], registry=r,
        )
        self.ready = Gauge("promotion_gate_ready", "1 when the server is ready to judge requests (every worker is)",
                           registry=r, multiprocess_mode="livemin")

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or the sum over all worker processes."""
        if not os.environ.get(MULTIPROCESS_ENV):
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return generate_latest(combined)
