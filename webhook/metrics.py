"""Prometheus metrics, one registry per app (no module-level globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "promotion_gate_connections_open", "Client connections open in this worker process", registry=r,
        )
        self.connections_closed = Counter(
            "promotion_gate_connections_closed",
            "Connections the server closed before answering them: a phase deadline passed (handshake-timeout, "
            "header-timeout, body-timeout, idle-timeout, write-timeout), TLS or HTTP errors, a body over the limit, "
            "or a connection bound (evicted: the oldest waiting connection made room; refused)",
            ["reason"], registry=r,
        )
        self.ready = Gauge("promotion_gate_ready", "1 when the server is ready to judge requests", registry=r)
