"""Which environment a namespace belongs to.

The ``promotion-gate.io/environment`` label on the namespace wins; a namespace without it falls back
to the policy's static map. In a cluster the labels are kept in a watch-backed cache (the webhook
needs only get/list/watch on namespaces); locally the static map alone serves.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from webhook.core.policy import Policy

ENVIRONMENT_LABEL = "promotion-gate.io/environment"
log = logging.getLogger("promotion_gate.environments")


class EnvironmentResolver(Protocol):
    def environment_of(self, namespace: str) -> str | None: ...


class StaticEnvironments:
    def __init__(self, policy: Policy) -> None:
        self._map = dict(policy.namespace_environments)

    def environment_of(self, namespace: str) -> str | None:
        return self._map.get(namespace)


class KubernetesEnvironments:
    """Namespace labels from a list+watch loop; a cache miss falls back to one direct GET."""

    def __init__(self, policy: Policy, core_api: Any, *, get_timeout: float = 2.0) -> None:
        self._static = dict(policy.namespace_environments)
        self._api = core_api
        self._labels: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._get_timeout = get_timeout
        self._thread = threading.Thread(target=self._run, name="namespace-watch", daemon=True)

    def start(self) -> KubernetesEnvironments:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def environment_of(self, namespace: str) -> str | None:
        with self._lock:
            known = namespace in self._labels
            label = self._labels.get(namespace)
        if not known:
            label = self._get(namespace)
        return label or self._static.get(namespace)

    def _get(self, namespace: str) -> str | None:
        try:
            ns = self._api.read_namespace(namespace, _request_timeout=self._get_timeout)
        except Exception as exc:  # an unknown namespace simply has no label
            log.warning("cannot read namespace %s: %s", namespace, exc)
            return None
        label = (ns.metadata.labels or {}).get(ENVIRONMENT_LABEL)
        with self._lock:
            self._labels[namespace] = label
        return str(label) if label else None

    def _run(self) -> None:
        from kubernetes import watch

        backoff = 1.0
        while not self._stop.is_set():
            try:
                listing = self._api.list_namespace(_request_timeout=30)
                with self._lock:
                    self._labels = {
                        ns.metadata.name: (ns.metadata.labels or {}).get(ENVIRONMENT_LABEL) for ns in listing.items
                    }
                self._synced.set()
                backoff = 1.0
                stream = watch.Watch().stream(
                    self._api.list_namespace, resource_version=listing.metadata.resource_version,
                    timeout_seconds=300, _request_timeout=330,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    ns = event["object"]
                    with self._lock:
                        if event["type"] == "DELETED":
                            self._labels.pop(ns.metadata.name, None)
                        else:
                            self._labels[ns.metadata.name] = (ns.metadata.labels or {}).get(ENVIRONMENT_LABEL)
            except Exception as exc:
                log.warning("namespace watch interrupted (%s); re-listing in %.0fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
