"""The admission path's view of the store: a deadline, verified-verdict caching, fail-closed.

Records are append-only and appended one at a time under a lock, so the highest sequence number (the
*version*) changes whenever anything — a promotion, a revocation — is added. Each request asks the
store for that version (one index-only query, under the deadline); verdicts evaluated at the same
version are still exact and are reused, anything else is read and evaluated again, so a revocation
applies to the very next request. Signature verification is memoised per record id (records are
immutable; the trusted keys are fixed per process). Only when the store does not answer within the
deadline may a verdict of the last version seen stand in, for ``cache_seconds`` after the store last
confirmed that version; otherwise the answer is ``store-unavailable``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

from cachetools import LRUCache

from webhook.core import promotion_rules
from webhook.core.policy import Environment, Policy
from webhook.core.promotion import (
    NOT_PROMOTED,
    Lookup,
    Promotion,
    PromotionStatus,
    StoredRecord,
    Subject,
    TagSubject,
)
from webhook.metrics import Metrics
from webhook.store.errors import StoreError
from webhook.store.sql import SqlStore

VERIFIED_CACHE_SIZE = 100_000
# (record version, states per environment, environments admission has answered for)
Entry = tuple[int, dict[str, PromotionStatus], set[str]]
VERDICT_CACHE_SIZE = 50_000
# (record version, the records that state a digest was built as the tag, newest first)
TagEntry = tuple[int, tuple[StoredRecord, ...]]
TAG_CACHE_SIZE = 10_000

K = TypeVar("K")
V = TypeVar("V")


class _SharedLru(Generic[K, V]):
    """An LRU shared by the request threads (cachetools' caches are not thread-safe on their own)."""

    def __init__(self, size: int) -> None:
        self._cache: LRUCache[K, V] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._cache[key] = value


class CachedRecordView:
    def __init__(self, store: SqlStore, policy: Policy, metrics: Metrics, *, workers: int = 8) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._deadline = policy.store_timeout_seconds
        self._ttl = policy.cache_seconds
        self._verified: _SharedLru[tuple[str, str], frozenset[str]] = _SharedLru(VERIFIED_CACHE_SIZE)
        self._verdicts: _SharedLru[Subject, Entry] = _SharedLru(VERDICT_CACHE_SIZE)
        self._tags: _SharedLru[TagSubject, TagEntry] = _SharedLru(TAG_CACHE_SIZE)
        self._version: int | None = None  # the last version the store reported ...
        self._confirmed_at = 0.0  # ... and when (time.monotonic)
        self._confirm_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-lookup")
        self._store_answers = True  # read on the request's thread (see _read)
        self._hit = metrics.cache.labels(result="hit")
        self._miss = metrics.cache.labels(result="miss")
        self._stale = metrics.cache.labels(result="stale-served")

    def _verify(self, stored: StoredRecord, environment: Environment) -> frozenset[str]:
        key = (stored.id, environment.name)
        cached = self._verified.get(key)
        if cached is not None:
            return cached
        verified = promotion_rules.verify_signatures(stored, environment)
        self._verified.put(key, verified)
        return verified

    def _entry(self, subject: Subject, version: int | None) -> Entry | None:
        entry = self._verdicts.get(subject)
        return entry if entry is not None and entry[0] == version else None

    def _tag_entry(self, tag: TagSubject, version: int) -> TagEntry | None:
        entry = self._tags.get(tag)
        if entry is None or entry[0] != version:
            return None
        # Its statements' digests must still have verdicts of this version (the LRUs evict separately).
        if any(self._entry((tag[0], s.record.digest), version) is None for s in entry[1]):
            return None
        return entry

    def _evaluate(self, subject: Subject, stored: list[StoredRecord], version: int) -> Entry:
        repository, digest = subject
        states = promotion_rules.evaluate(self._policy, stored, repository, digest, verifier=self._verify)
        entry: Entry = (version, states, set())
        self._verdicts.put(subject, entry)
        return entry

    def _lookup(self, subjects: Sequence[Subject],
                tags: Sequence[TagSubject]) -> tuple[int, dict[Subject, Entry], dict[TagSubject, TagEntry]]:
        started = time.perf_counter()
        try:
            version = self._store.records_version()
            with self._confirm_lock:  # lookups finish out of order: never step back to an older version
                if self._version is None or version >= self._version:
                    self._version, self._confirmed_at = version, time.monotonic()
            answers = {s: entry for s in subjects if (entry := self._entry(s, version)) is not None}
            tag_answers = {t: found for t in tags if (found := self._tag_entry(t, version)) is not None}
            self._hit.inc(len(answers))
            missing = [s for s in subjects if s not in answers]
            missing_tags = [t for t in tags if t not in tag_answers]
            if not missing and not missing_tags:
                return version, answers, tag_answers
            self._miss.inc(len(missing))
            # One query for both questions: the records of the pinned digests, and of the digests last
            # recorded as built as each tag.
            stored = self._store.records_for_subjects([digest for _, digest in missing], missing_tags)
        finally:
            self._metrics.store_latency.observe(time.perf_counter() - started)
        for subject in missing:
            answers[subject] = self._evaluate(subject, stored.get(subject[1], []), version)
        for repository, tag in missing_tags:
            statements = tuple(promotion_rules.tag_statements(
                [s for records in stored.values() for s in records], repository, tag))
            for digest in dict.fromkeys(s.record.digest for s in statements):
                if self._entry((repository, digest), version) is None:
                    self._evaluate((repository, digest), stored.get(digest, []), version)
            tag_answers[(repository, tag)] = (version, statements)
            self._tags.put((repository, tag), (version, statements))
        return version, answers, tag_answers

    def _read(self, subjects: Sequence[Subject],
              tags: Sequence[TagSubject]) -> tuple[int, dict[Subject, Entry], dict[TagSubject, TagEntry]]:
        """:meth:`_lookup` within the deadline, on this thread while the store answers.

        On the request's own thread the store's watchdog interrupts a read at the deadline
        (:mod:`webhook.store.deadlines`), which saves two thread wake-ups per request. It cannot
        interrupt a connection being made, so when no reader connection is idle, and after a failure
        until a lookup succeeds again, lookups go to the pool and the request waits for at most the
        deadline, whatever the store does.
        """
        if self._store_answers and self._store.reader_idle():
            with self._store.deadline(self._deadline) as watch:
                try:
                    return self._lookup(subjects, tags)
                except StoreError as exc:
                    self._store_answers = False
                    if watch.expired:
                        raise TimeoutError("timed out") from exc
                    raise
        try:
            found = self._pool.submit(self._watched_lookup, subjects, tags).result(timeout=self._deadline)
        except FutureTimeout as exc:
            raise TimeoutError("timed out") from exc
        self._store_answers = True
        return found

    def _watched_lookup(self, subjects: Sequence[Subject],
                        tags: Sequence[TagSubject]) -> tuple[int, dict[Subject, Entry], dict[TagSubject, TagEntry]]:
        # On a pool thread, under the same deadline: a read that hangs frees its thread at the deadline
        # instead of holding it until the network gives up.
        with self._store.deadline(self._deadline):
            return self._lookup(subjects, tags)

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        try:
            version, entries, tag_entries = self._read(subjects, tags)
        except (TimeoutError, StoreError) as exc:
            self._metrics.store_errors.labels(operation="lookup").inc()
            detail = "timed out" if isinstance(exc, TimeoutError) else str(exc).splitlines()[0][:160]
            # No hint for tags: the plain mutable-tag denial stands.
            return Lookup({subject: self._fallback(subject, environment, detail) for subject in subjects})
        answers = {}
        for subject in subjects:
            _, states, asked = entries[subject]
            asked.add(environment)
            answers[subject] = states.get(environment, NOT_PROMOTED)
        tag_answers = {}
        for (repository, tag), (_, statements) in tag_entries.items():
            def states_of(digest: str, repository: str = repository) -> Mapping[str, PromotionStatus]:
                entry = self._entry((repository, digest), version)
                return entry[1] if entry is not None else {}

            tag_answers[(repository, tag)] = promotion_rules.promoted_for_tag(statements, environment, states_of)
        return Lookup(answers, tag_answers)

    def _fallback(self, subject: Subject, environment: str, detail: str) -> PromotionStatus:
        # Only a verdict admission has actually given (this digest, this environment) stands in.
        entry = self._entry(subject, self._version)
        if entry is not None and environment in entry[2] and time.monotonic() - self._confirmed_at <= self._ttl:
            self._stale.inc()
            return entry[1].get(environment, NOT_PROMOTED)
        return PromotionStatus(Promotion.UNAVAILABLE, detail=detail)
