"""The store as a scan sees it: every digest of a scan read in a few batched queries, kept per record version.

Admission asks about the few digests of one request (:mod:`webhook.record_view`); a scan asks about
every digest that runs in the cluster at once. :meth:`BatchedRecordView.prefetch` reads them in
batches of :data:`BATCH` digests per query and evaluates each with the promotion rules, then
:meth:`statuses` answers the admission core from memory.

Records are append-only and numbered (``records_version`` is ``max(seq)``), so between two scans only
the digests named by records added since the last version can change state: those are read again,
the others are reused. A revocation therefore reaches the next scan with one query for the version,
one for the new records, and one per batch of affected digests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cachetools import LRUCache

from webhook.core import promotion_rules
from webhook.core.policy import Environment, Policy
from webhook.core.promotion import NOT_PROMOTED, Lookup, PromotionStatus, StoredRecord, Subject, TagSubject
from webhook.core.records import RecordKind
from webhook.store.sql import SqlStore

BATCH = 500  # digests per query
VERIFIED_CACHE_SIZE = 100_000


class BatchedRecordView:
    def __init__(self, store: SqlStore, policy: Policy, *, batch: int = BATCH) -> None:
        self._store = store
        self._policy = policy
        self._batch = batch
        self._version: int | None = None
        self._records: dict[str, list[StoredRecord]] = {}  # digest -> its records, for the current subjects
        self._states: dict[Subject, dict[str, PromotionStatus]] = {}
        self._verified: LRUCache[tuple[str, str], frozenset[str]] = LRUCache(maxsize=VERIFIED_CACHE_SIZE)
        self.queries = 0  # store queries made, for the benchmark and the logs

    @property
    def version(self) -> int | None:
        return self._version

    def _verify(self, stored: StoredRecord, environment: Environment) -> frozenset[str]:
        key = (stored.id, environment.name)
        verified = self._verified.get(key)
        if verified is None:
            verified = self._verified[key] = promotion_rules.verify_signatures(stored, environment)
        return verified

    def prefetch(self, subjects: Iterable[Subject]) -> int:
        """Read and evaluate every subject of the coming scan; raises ``StoreError`` when the store fails."""
        wanted = set(subjects)
        version = self._store.records_version()
        self.queries += 1
        stale: set[str] = set()
        if self._version is not None and version != self._version:
            added = self._store.find_records(after=self._version, limit=self._batch + 1)
            self.queries += 1
            # Many new records: read everything again.
            stale = set(self._records) if len(added) > self._batch else {s.record.digest for s in added}
        # Keep only what this scan needs: memory follows the cluster, not the store.
        self._records = {d: r for d, r in self._records.items() if d not in stale}
        self._states = {s: st for s, st in self._states.items() if s in wanted and s[1] not in stale}
        missing = sorted({digest for _, digest in wanted if digest not in self._records})
        for start in range(0, len(missing), self._batch):
            self._records.update(self._store.records_for_digests(missing[start:start + self._batch]))
            self.queries += 1
        needed = {digest for _, digest in wanted}
        self._records = {d: r for d, r in self._records.items() if d in needed}
        for subject in wanted:
            if subject not in self._states:
                repository, digest = subject
                self._states[subject] = promotion_rules.evaluate(self._policy, self._records.get(digest, []),
                                                                 repository, digest, verifier=self._verify)
        self._version = version
        return version

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        """What admission would answer for these subjects (a scan asks nothing about tags)."""
        return Lookup(self.statuses(subjects, environment))

    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        unknown = [s for s in subjects if s not in self._states]
        if unknown:  # not prefetched (a caller outside a scan): read them now
            self.prefetch([*self._states, *unknown])
        return {s: self._states[s].get(environment, NOT_PROMOTED) for s in subjects}

    def revocation(self, subject: Subject, environment: str) -> StoredRecord | None:
        """The newest revocation of ``subject`` from ``environment`` among the prefetched records."""
        repository, digest = subject
        found = [s for s in self._records.get(digest, ())
                 if s.record.kind is RecordKind.REVOCATION and s.record.environment == environment
                 and s.record.repository == repository]
        return max(found, key=lambda s: s.seq, default=None)
