"""Which environment a namespace belongs to.

The ``promotion-gate.io/environment`` label on the namespace wins; a namespace without it falls back
to the policy's static map. In a cluster the labels are kept in a watch-backed cache (the webhook
needs only get/list/watch on namespaces); locally the static map alone serves.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from cachetools import TTLCache

from webhook.core.policy import Policy

ENVIRONMENT_LABEL = "promotion-gate.io/environment"
log = logging.getLogger("promotion_gate.environments")


# A namespace name is a DNS label (RFC 1123): anything else cannot exist, and is never looked up.
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MISSING_TTL_SECONDS = 60.0  # how long "no such namespace" is believed before the API server is asked again
MISSING_CACHE_SIZE = 10_000
LOOKUPS_PER_SECOND = 5.0  # direct GETs on a cache miss; beyond this a miss is answered "unknown" at once


class EnvironmentResolver(Protocol):
    def environment_of(self, namespace: str) -> str | None: ...

    def known(self, namespace: str) -> bool:
        """Whether the namespace exists, as far as the resolver knows (bounds metric label values)."""
        ...


class StaticEnvironments:
    def __init__(self, policy: Policy) -> None:
        self._map = dict(policy.namespace_environments)

    def environment_of(self, namespace: str) -> str | None:
        return self._map.get(namespace)

    def known(self, namespace: str) -> bool:
        return namespace in self._map


class LookupBudget:
    """A token bucket: at most ``rate`` lookups a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class KubernetesEnvironments:
    """Namespace labels from a list+watch loop.

    A namespace the cache does not hold is looked up with one direct GET (a namespace created a moment
    ago may be judged before its watch event arrives), but only when its name could exist, at most
    ``LOOKUPS_PER_SECOND``, and "not found" is remembered for ``MISSING_TTL_SECONDS``: a caller who
    makes up namespace names costs the API server almost nothing.
    """

    def __init__(self, policy: Policy, core_api: Any, *, get_timeout: float = 2.0,
                 budget: LookupBudget | None = None) -> None:
        self._static = dict(policy.namespace_environments)
        self._api = core_api
        self._labels: dict[str, str | None] = {}
        self._missing: TTLCache[str, bool] = TTLCache(maxsize=MISSING_CACHE_SIZE, ttl=MISSING_TTL_SECONDS)
        self._budget = budget or LookupBudget(LOOKUPS_PER_SECOND, burst=LOOKUPS_PER_SECOND * 4)
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

    def known(self, namespace: str) -> bool:
        with self._lock:
            return namespace in self._labels

    def _get(self, namespace: str) -> str | None:
        with self._lock:
            missing = namespace in self._missing
        if missing or not NAMESPACE_NAME.fullmatch(namespace) or not self._budget.take():
            return None
        try:
            ns = self._api.read_namespace(namespace, _request_timeout=self._get_timeout)
        except Exception as exc:  # an unknown namespace simply has no label
            if getattr(exc, "status", None) == 404:
                with self._lock:
                    self._missing[namespace] = True
            else:
                log.warning("cannot read namespace %s: %s", namespace[:63], exc)
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
                            self._missing.pop(ns.metadata.name, None)
            except Exception as exc:
                log.warning("namespace watch interrupted (%s); re-listing in %.0fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
