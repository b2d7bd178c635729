"""Composition root: turn validated settings into the services the HTTP shell needs.

:func:`preflight` runs once in the parent process and fails start-up with a :class:`StartupError`
that the CLI prints; :func:`build_app` runs in each worker process and builds that worker's own store
engine, caches, metrics registry and namespace watch.
"""

from __future__ import annotations

import atexit
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask

from webhook import environments, key_files
from webhook.cluster_access import KubeAccess
from webhook.core.errors import GateError
from webhook.core.keys import InvalidKey
from webhook.core.policy import Policy
from webhook.core.promotion import NoRecords, RecordView
from webhook.decision_log import DecisionLog, StdoutDecisionLog
from webhook.metrics import Metrics
from webhook.server import app as server_app
from webhook.server.app import ValidateClients
from webhook.server.connections import CloseReason
from webhook.server.serving import Served
from webhook.server.tls import CertificateReloader, TlsFiles
from webhook.store import StoreError, open_store, redact

log = logging.getLogger("promotion_gate.wiring")


class StartupError(GateError):
    """The server cannot start with these settings; the message says what to change."""


@dataclass(frozen=True)
class Settings:
    policy: Policy
    store_url: str | None = None
    server_key: Path | None = None
    use_kubernetes: bool = False
    in_cluster: bool = False  # the pod's service account, not a kubeconfig, reaches the API server
    running_lookup: KubeAccess | None = None  # lists Pods for GET /api/v1/running/<digest>; None: no access
    enable_baseline: bool = False
    validate_clients: ValidateClients = field(default_factory=ValidateClients)


def check_tls(files: TlsFiles) -> None:
    """Fail start-up, not the first handshake, on a certificate, key or client CA that cannot be loaded."""
    try:
        CertificateReloader(files)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"TLS: {exc}") from exc


def describe_store(url: str | None) -> str:
    return redact(url) if url else "none (digest-only)"


def preflight(settings: Settings) -> None:
    """Fail start-up early, in the parent process, with a clear message."""
    if settings.store_url:
        try:
            open_store(settings.store_url, migrate=True).close()
        except StoreError as exc:
            raise StartupError(f"store: {exc}") from exc
    elif settings.policy.environments:
        raise StartupError(
            "the policy declares environments, which need a store: pass --store sqlite:///var/promotion-gate.db "
            "or a PostgreSQL URL"
        )
    checkpoint_keys = {k.key_id for k in settings.policy.audit_checkpoint_keys}
    if settings.server_key is not None:
        try:
            server_key = key_files.load_signing_key(settings.server_key)
        except InvalidKey as exc:
            raise StartupError(f"--server-key: {exc}") from exc
        if checkpoint_keys and server_key.key_id not in checkpoint_keys:
            raise StartupError(f"--server-key: its public key ({server_key.key_id[:12]}) is not listed under "
                               "audit.checkpointKeys, so its checkpoints would not verify")
    elif checkpoint_keys and settings.store_url and settings.policy.audit_to_store:
        raise StartupError("audit.checkpointKeys promises signed checkpoints: pass --server-key (or "
                           "$PROMOTION_GATE_SERVER_KEY) with the private key of one of them")


def _environment_resolver(settings: Settings) -> tuple[environments.EnvironmentResolver, Any]:
    if not settings.use_kubernetes:
        return environments.StaticEnvironments(settings.policy), None
    from kubernetes import client, config

    if settings.in_cluster:
        config.load_incluster_config()
    else:
        config.load_kube_config()
    resolver = environments.KubernetesEnvironments(settings.policy, client.CoreV1Api()).start()
    return resolver, resolver


class ConnectionMetrics:
    """The serving loop's connection events, counted in the app's registry (label values: a fixed set)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def closed(self, reason: CloseReason) -> None:
        self._metrics.connections_closed.labels(reason=reason.value).inc()

    def open_connections(self, count: int) -> None:
        self._metrics.connections_open.set(count)


def build_served(settings: Settings) -> Served:
    """Called once in each worker process."""
    metrics = Metrics()
    return Served(app=build_app(settings, metrics), events=ConnectionMetrics(metrics))


def build_app(settings: Settings, metrics: Metrics | None = None) -> Flask:
    metrics = metrics or Metrics()
    resolver, watcher = _environment_resolver(settings)
    records: RecordView = NoRecords()
    decision_log: DecisionLog = StdoutDecisionLog(policy_digest=settings.policy.digest)
    api = None
    if settings.store_url:
        from webhook.decision_log import ChainedDecisionLog
        from webhook.ledger import Ledger
        from webhook.record_view import CachedRecordView
        from webhook.server import api as api_mod

        store = open_store(settings.store_url)
        records = CachedRecordView(store, settings.policy, metrics)
        server_key = key_files.load_signing_key(settings.server_key) if settings.server_key else None
        if settings.policy.audit_to_store:
            chained = ChainedDecisionLog(store, settings.policy, metrics, server_key=server_key,
                                         stdout=StdoutDecisionLog(policy_digest=settings.policy.digest))
            atexit.register(chained.close)  # a worker that stops cleanly leaves no event unsealed
            decision_log = chained
        running = None
        if settings.running_lookup is not None:
            from webhook.cluster_listing import Lister, RunningLookup

            access = settings.running_lookup
            running = RunningLookup(lambda: Lister(access.api_client(), timeout=10.0))
        api = api_mod.register(Ledger(store, settings.policy), running)

    def ready() -> tuple[bool, str]:
        if watcher is not None and not watcher.synced:
            return False, "namespace cache not synced yet"
        return True, "ok"

    services = server_app.Services(
        policy=settings.policy, environments=resolver, records=records, decision_log=decision_log,
        metrics=metrics, api=api, ready=ready, enable_baseline=settings.enable_baseline,
        validate_clients=settings.validate_clients,
    )
    return server_app.create_app(services)
