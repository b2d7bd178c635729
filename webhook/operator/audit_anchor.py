"""The audit log's external anchor: the newest signed checkpoint, kept in a ConfigMap by the operator.

Someone with write access to the database can delete the newest events together with their
checkpoints, or empty the audit tables: the database alone cannot show that anything is missing.
The operator therefore copies the newest signed checkpoint into a ConfigMap (outside the database,
guarded by Kubernetes RBAC) and moves it forward only while the log still holds the checkpoint it
names and every later one chains onto it and carries a valid signature by a key of
``audit.checkpointKeys`` (:func:`webhook.store.audit_chain.advance_anchor`). A truncated, emptied or
rewritten log therefore never replaces the anchor that exposes it: the operator keeps the anchor,
writes the problem into the ConfigMap's ``status``, logs it and posts a Warning event, and
``promotion-gate audit verify --anchor`` (given the ConfigMap) names it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from webhook.core import keys
from webhook.store import SqlStore
from webhook.store.audit_chain import AnchorOutcome, advance_anchor
from webhook.store.audit_format import Checkpoint, checkpoint_from_json

CHECKPOINT_KEY = "checkpoint.json"
STATUS_KEY = "status"
INTERVAL_SECONDS = 30.0
TAMPERED_REASON = "AuditLogTampered"

log = logging.getLogger("promotion_gate.operator.audit_anchor")


@dataclass(frozen=True)
class AnchorSettings:
    namespace: str
    configmap: str
    keys: tuple[keys.VerifyingKey, ...]
    interval: float = INTERVAL_SECONDS


@dataclass(frozen=True)
class Plan:
    """What to write: new ConfigMap data (None: nothing), and the problem to report (None: none)."""

    data: dict[str, str] | None
    problem: str | None


def anchored_in(data: dict[str, str] | None) -> Checkpoint | None:
    text = (data or {}).get(CHECKPOINT_KEY)
    if not text:
        return None
    try:
        return checkpoint_from_json(json.loads(text))
    except ValueError:
        return None


def plan(data: dict[str, str] | None, outcome: AnchorOutcome) -> Plan:
    """The pure decision: move the anchor forward, report a problem once, or leave everything as it is."""
    current = dict(data or {})
    anchored = anchored_in(current)
    if outcome.problem is not None:
        status = f"TAMPERED: {outcome.problem}"
        if current.get(STATUS_KEY) == status:
            return Plan(None, outcome.problem)  # reported already; the anchor stays as it is
        return Plan({**current, STATUS_KEY: status}, outcome.problem)
    checkpoint = outcome.checkpoint
    if checkpoint is None or not outcome.advanced_from(anchored):
        return Plan(None, None)
    return Plan({CHECKPOINT_KEY: json.dumps(checkpoint.to_json(), separators=(",", ":")),
                 STATUS_KEY: f"anchored checkpoint {checkpoint.seq} (event {checkpoint.event_seq}, "
                             f"{checkpoint.created_at})"}, None)


def reconcile(core: Any, store: SqlStore, settings: AnchorSettings) -> Plan:
    """One round: read the ConfigMap, check the log against it, write what :func:`plan` says."""
    from kubernetes.client.exceptions import ApiException

    try:
        existing = core.read_namespaced_config_map(settings.configmap, settings.namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        existing = None
    data = dict(existing.data or {}) if existing is not None else None
    outcome = advance_anchor(store, list(settings.keys), anchored_in(data))
    decided = plan(data, outcome)
    if decided.data is not None:
        metadata: dict[str, Any] = {"name": settings.configmap, "namespace": settings.namespace,
                                    "labels": {"app.kubernetes.io/part-of": "promotion-gate",
                                               "app.kubernetes.io/component": "audit-anchor"}}
        body = {"apiVersion": "v1", "kind": "ConfigMap", "data": decided.data, "metadata": metadata}
        if existing is None:
            core.create_namespaced_config_map(settings.namespace, body)
        else:  # the resourceVersion read above: a concurrent writer makes this fail, and the next round retries
            metadata["resourceVersion"] = existing.metadata.resource_version
            core.replace_namespaced_config_map(settings.configmap, settings.namespace, body)
        if decided.problem is not None:
            _warn(core, settings, decided.problem)
    if decided.problem is not None:
        log.error("audit log TAMPERED: %s; the anchor in ConfigMap %s/%s was kept", decided.problem,
                  settings.namespace, settings.configmap)
    elif decided.data is not None:
        log.info("audit anchor: %s", decided.data[STATUS_KEY])
    return decided


def _warn(core: Any, settings: AnchorSettings, problem: str) -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        core.create_namespaced_event(settings.namespace, {
            "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": TAMPERED_REASON,
            "message": f"audit log TAMPERED: {problem}"[:1024],
            "metadata": {"generateName": f"{settings.configmap}.", "namespace": settings.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": settings.configmap,
                               "namespace": settings.namespace},
            "source": {"component": "promotion-gate-operator"}, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1})
    except Exception as exc:  # the ConfigMap and the log already say it; an event is a courtesy
        log.warning("could not post the audit alarm as an event: %s", exc)
