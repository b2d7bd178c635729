"""Composition root: turn validated settings into the services the HTTP shell needs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from flask import Flask

from webhook import audit, decision, environments, server
from webhook.metrics import Metrics
from webhook.policy import Policy

log = logging.getLogger("promotion_gate.runtime")


@dataclass(frozen=True)
class Settings:
    policy: Policy
    store_url: str | None = None
    server_key: Path | None = None
    use_kubernetes: bool | None = None
    enable_baseline: bool = False


def describe_store(url: str | None) -> str:
    if not url:
        return "none (digest-only)"
    from webhook.store import redact

    return redact(url)


def preflight(settings: Settings) -> None:
    """Fail start-up early, in the parent process, with a clear message."""
    if settings.store_url:
        from webhook.store import StoreError, open_store

        try:
            store = open_store(settings.store_url)
            store.migrate()
            store.close()
        except StoreError as exc:
            raise click.ClickException(f"store: {exc}") from exc
    elif settings.policy.environments:
        raise click.ClickException(
            "the policy declares environments, which need a store: pass --store sqlite:///var/promotion-gate.db "
            "or a PostgreSQL URL"
        )
    if settings.server_key is not None:
        from webhook import keys

        try:
            keys.load_signing_key(settings.server_key)
        except keys.KeyFileError as exc:
            raise click.ClickException(f"--server-key: {exc}") from exc


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _environment_resolver(settings: Settings) -> tuple[environments.EnvironmentResolver, Any]:
    use = settings.use_kubernetes if settings.use_kubernetes is not None else (
        _in_cluster() or settings.policy.watch_namespaces)
    if not use:
        return environments.StaticEnvironments(settings.policy), None
    from kubernetes import client, config

    if _in_cluster():
        config.load_incluster_config()
    else:
        config.load_kube_config()
    resolver = environments.KubernetesEnvironments(settings.policy, client.CoreV1Api()).start()
    return resolver, resolver


def build_app(settings: Settings) -> Flask:
    """Called once in each worker process."""
    metrics = Metrics()
    resolver, watcher = _environment_resolver(settings)
    records: decision.RecordView = decision.NoRecords()
    decision_log: audit.DecisionLog = audit.StdoutDecisionLog(policy_digest=settings.policy.digest)
    api = None
    if settings.store_url:
        from webhook import api as api_mod
        from webhook import keys
        from webhook.store import open_store
        from webhook.store.audit_chain import ChainedDecisionLog
        from webhook.store.views import CachedRecordView

        store = open_store(settings.store_url)
        records = CachedRecordView(store, settings.policy, metrics)
        server_key = keys.load_signing_key(settings.server_key) if settings.server_key else None
        if settings.policy.audit_to_store:
            decision_log = ChainedDecisionLog(store, settings.policy, metrics, server_key=server_key,
                                              stdout=audit.StdoutDecisionLog(policy_digest=settings.policy.digest))
        api = api_mod.register(store)

    def ready() -> tuple[bool, str]:
        if watcher is not None and not watcher.synced:
            return False, "namespace cache not synced yet"
        return True, "ok"

    services = server.Services(
        policy=settings.policy, environments=resolver, records=records, decision_log=decision_log,
        metrics=metrics, api=api, ready=ready, enable_baseline=settings.enable_baseline,
    )
    return server.create_app(services)
