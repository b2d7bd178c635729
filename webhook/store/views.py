"""The admission path's view of the store: a deadline, verified-verdict caching, fail-closed.

Records are immutable, so the expensive part — signature verification — is memoised per record id
for the life of the process (the policy, and so the trusted keys, is fixed per process). Each lookup
still reads the digest's rows so that a revocation is honoured at once; only when the store does not
answer within the deadline does a cached verdict younger than ``cache_seconds`` stand in, and
otherwise the answer is ``store-unavailable``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from webhook import promotion_rules
from webhook.decision import Promotion, PromotionStatus, Subject
from webhook.metrics import Metrics
from webhook.policy import Environment, Policy
from webhook.promotion_rules import StoredRecord
from webhook.store.errors import StoreError
from webhook.store.sql import SqlStore

VERIFIED_CACHE_SIZE = 100_000
VERDICT_CACHE_SIZE = 50_000


class _Lru(OrderedDict[tuple[str, ...], object]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._lock = threading.Lock()

    def get_item(self, key: tuple[str, ...]) -> object | None:
        with self._lock:
            value = self.get(key)
            if value is not None:
                self.move_to_end(key)
            return value

    def put(self, key: tuple[str, ...], value: object) -> None:
        with self._lock:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self._size:
                self.popitem(last=False)


class CachedRecordView:
    def __init__(self, store: SqlStore, policy: Policy, metrics: Metrics, *, workers: int = 8) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._deadline = policy.store_timeout_seconds
        self._ttl = policy.cache_seconds
        self._verified = _Lru(VERIFIED_CACHE_SIZE)
        self._verdicts = _Lru(VERDICT_CACHE_SIZE)
        self._lock = threading.Lock()
        self._version: int | None = None
        self._evaluated: dict[Subject, dict[str, PromotionStatus]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-lookup")
        self._hit = metrics.cache.labels(result="hit")
        self._miss = metrics.cache.labels(result="miss")

    def _verify(self, stored: StoredRecord, environment: Environment) -> frozenset[str]:
        key = (stored.id, environment.name)
        cached = self._verified.get_item(key)
        if isinstance(cached, frozenset):
            self._hit.inc()
            return cached
        self._miss.inc()
        verified = promotion_rules.verify_signatures(stored, environment)
        self._verified.put(key, verified)
        return verified

    def _lookup(self, subjects: Sequence[Subject]) -> dict[Subject, dict[str, PromotionStatus]]:
        started = time.perf_counter()
        try:
            # Records are append-only and appended one at a time under a lock, so the highest sequence
            # number changes whenever anything (a promotion, a revocation) is added. While it stands
            # still, evaluations made at that version are still exact: one index-only query per request.
            version = self._store.records_version()
            with self._lock:
                if version != self._version:
                    self._evaluated.clear()
                    self._version = version
                known = {s: self._evaluated[s] for s in subjects if s in self._evaluated}
            missing = [s for s in subjects if s not in known]
            if not missing:
                self._hit.inc()
                return known
            stored = self._store.records_for_digests([digest for _, digest in missing])
        finally:
            self._metrics.store_latency.observe(time.perf_counter() - started)
        fresh = {(repository, digest): promotion_rules.evaluate(self._policy, stored.get(digest, []), repository,
                                                                digest, verifier=self._verify)
                 for repository, digest in missing}
        with self._lock:
            if self._version == version and len(self._evaluated) < VERDICT_CACHE_SIZE:
                self._evaluated.update(fresh)
        return {**known, **fresh}

    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        future = self._pool.submit(self._lookup, subjects)
        try:
            states = future.result(timeout=self._deadline)
        except (FutureTimeout, StoreError) as exc:
            self._metrics.store_errors.labels(operation="lookup").inc()
            detail = "timed out" if isinstance(exc, FutureTimeout) else str(exc).splitlines()[0][:160]
            return {subject: self._cached(subject, environment, detail) for subject in subjects}
        now = time.monotonic()
        answers = {}
        for subject in subjects:
            fresh = states[subject].get(environment, PromotionStatus(Promotion.NOT_PROMOTED))
            self._verdicts.put((*subject, environment), (now, fresh))
            answers[subject] = fresh
        return answers

    def _cached(self, subject: Subject, environment: str, detail: str) -> PromotionStatus:
        cached = self._verdicts.get_item((*subject, environment))
        if isinstance(cached, tuple) and time.monotonic() - cached[0] <= self._ttl:
            self._metrics.cache.labels(result="stale-served").inc()
            status: PromotionStatus = cached[1]
            return status
        return PromotionStatus(Promotion.UNAVAILABLE, detail=detail)
