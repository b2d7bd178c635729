"""The tamper-evident decision log: a hash chain in the store, anchored by signed checkpoints.

Each event's hash covers its sequence number, the previous event's hash and its own canonical JSON,
so editing, deleting or reordering any stored event breaks the chain at that event. Someone able to
rewrite the whole table could recompute every hash; signed checkpoints (made with the server's key,
which the database never holds) catch that, and let old events be pruned without breaking the chain.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import orjson

from webhook import audit, keys
from webhook.admission import AdmissionRequest
from webhook.decision import Verdict
from webhook.metrics import Metrics
from webhook.policy import Policy
from webhook.store.errors import StoreError, StoreUnavailable
from webhook.store.sql import AuditEntry, SqlStore

GENESIS = "0" * 64
log = logging.getLogger("promotion_gate.audit")


def canonical(event: dict[str, object]) -> str:
    # Compact, sorted keys, UTF-8. Verification hashes the stored text itself, never a re-serialisation.
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS).decode()


def chain_hash(seq: int, prev_hash: str, event_json: str) -> str:
    return hashlib.sha256(f"{seq}\n{prev_hash}\n{event_json}".encode()).hexdigest()


def checkpoint_message(event_seq: int, event_hash: str) -> bytes:
    return f"promotion-gate audit checkpoint v1\n{event_seq}\n{event_hash}".encode()


class ChainedDecisionLog:
    """Appends each decision to the chain with group commit, and to stdout.

    Request threads hand their event to one writer thread and wait for its commit: under load the
    writer commits whatever has queued up in one transaction, so many decisions share one fsync
    while each request still learns whether its own event was stored (``audit.onWriteFailure``).
    """

    def __init__(self, store: SqlStore, policy: Policy, metrics: Metrics, *,
                 server_key: keys.SigningKey | None = None, stdout: audit.StdoutDecisionLog | None = None,
                 max_batch: int = 256) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._key = server_key
        self._stdout = stdout or audit.StdoutDecisionLog()
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[AuditEntry, Future[int]]] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def entry(original: dict[str, object]) -> AuditEntry:
        event = dict(original)  # the writer thread owns this copy; the caller may go on changing its own
        images = event.get("images")
        digests = [str(i["digest"]) for i in images if isinstance(i, dict) and i.get("digest")] \
            if isinstance(images, list) else []
        reasons = event.get("reasons")

        def build(seq: int, prev: str) -> tuple[str, str]:
            event["seq"] = seq
            text = canonical(event)
            return text, chain_hash(seq, prev, text)

        return AuditEntry(build, time=str(event["time"]), uid=str(event["uid"]), namespace=str(event["namespace"]),
                          username=str(event["user"]), allowed=bool(event["allowed"]),
                          reasons=",".join(str(r) for r in reasons) if isinstance(reasons, list) else "",
                          digests=digests)

    def append(self, event: dict[str, object], timeout: float | None = None) -> int:
        done: Future[int] = Future()
        self._queue.put((self.entry(event), done))
        try:
            return done.result(timeout=timeout)
        except FutureTimeout as exc:
            raise StoreUnavailable("audit write timed out") from exc

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                rows = self._store.append_audit([entry for entry, _ in batch])
            except Exception as exc:  # every waiter learns of the failure; nothing is dropped silently
                for _, done in batch:
                    done.set_exception(exc if isinstance(exc, StoreError) else StoreError(str(exc)))
                continue
            for row, (_, done) in zip(rows, batch, strict=True):
                done.set_result(row.seq)
            if self._key is not None:
                for row in rows:
                    if row.seq % self._policy.audit_checkpoint_every == 0:
                        try:
                            self.checkpoint(row.seq, row.hash)
                        except StoreError as exc:
                            self._metrics.audit_errors.inc()
                            log.error("checkpoint at event %s failed: %s", row.seq, exc)

    def checkpoint(self, seq: int, event_hash: str) -> None:
        assert self._key is not None
        signature = base64.b64encode(self._key.sign(checkpoint_message(seq, event_hash))).decode()
        self._store.add_checkpoint(seq, event_hash, audit.now_rfc3339(), self._key.key_id, signature)

    def record(self, request: AdmissionRequest, verdict: Verdict) -> Verdict:
        event = audit.audit_event(request, verdict, self._policy.digest)
        started = time.perf_counter()
        try:
            self.append(event, timeout=self._policy.store_timeout_seconds)
        except StoreError as exc:
            self._metrics.audit_errors.inc()
            log.error("audit event %s could not be stored: %s", request.uid, exc)
            verdict = audit.audit_failure_verdict(verdict, self._policy.audit_on_write_failure, "store error")
            event.update(allowed=verdict.allowed, auditStoreError=str(exc)[:200])
        finally:
            self._metrics.audit_latency.observe(time.perf_counter() - started)
        self._stdout.write(event)
        return verdict


@dataclass
class VerifyReport:
    events: int = 0
    checkpoints_verified: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: SqlStore, trusted: list[keys.VerifyingKey] | None = None, *, batch: int = 5000) -> VerifyReport:
    """Walk the chain and the checkpoints; name the first event that was altered, removed or reordered."""
    report = VerifyReport()
    checkpoints = store.checkpoints()
    table = {k.key_id: k for k in trusted or []}
    by_event: dict[int, str] = {}
    for cp in checkpoints:
        key = table.get(cp.key_id)
        if key is None:
            if trusted is not None:
                report.problems.append(f"checkpoint {cp.seq} is signed by an unknown key {cp.key_id[:12]}")
                return report
            continue
        try:
            signature = base64.b64decode(cp.signature)
        except ValueError:
            signature = b""
        if not key.verify(signature, checkpoint_message(cp.event_seq, cp.event_hash)):
            report.problems.append(f"checkpoint {cp.seq} (event {cp.event_seq}) has an invalid signature")
            return report
        report.checkpoints_verified += 1
        by_event[cp.event_seq] = cp.event_hash
    if trusted is None and checkpoints:
        report.notes.append("checkpoint signatures not checked (pass --key with the server's public key)")

    anchors = [cp for cp in checkpoints if cp.pruned_before]
    expected_seq, expected_prev = 1, GENESIS
    if anchors:
        anchor = max(anchors, key=lambda cp: cp.event_seq)
        expected_seq, expected_prev = anchor.event_seq + 1, anchor.event_hash
        report.notes.append(f"events up to {anchor.event_seq} were pruned at a checkpoint")
    last_seq = expected_seq - 1
    after = 0
    while True:
        rows = store.audit_rows(after=after, limit=batch)
        if not rows:
            break
        for row in rows:
            after = row.seq
            if row.seq < expected_seq:
                report.problems.append(f"event {row.seq} is out of order (expected event {expected_seq})")
                return report
            if row.seq > expected_seq:
                missing = (f"event {expected_seq}" if row.seq == expected_seq + 1
                           else f"events {expected_seq}-{row.seq - 1}")
                report.problems.append(f"{missing} removed: the chain jumps from event {expected_seq - 1} to {row.seq}")
                return report
            if row.prev_hash != expected_prev:
                report.problems.append(f"event {row.seq} does not follow event {row.seq - 1}: the chain was reordered "
                                       "or an earlier event was altered")
                return report
            try:
                stored_seq = json.loads(row.event).get("seq")
            except ValueError:
                stored_seq = None
            if stored_seq != row.seq or chain_hash(row.seq, row.prev_hash, row.event) != row.hash:
                report.problems.append(f"event {row.seq} was altered: its content does not match its hash")
                return report
            if row.seq in by_event and by_event[row.seq] != row.hash:
                report.problems.append(f"event {row.seq} does not match signed checkpoint: the chain was rewritten "
                                       "from here or earlier")
                return report
            report.events += 1
            expected_seq, expected_prev, last_seq = row.seq + 1, row.hash, row.seq
    beyond = [seq for seq in by_event if seq > last_seq]
    if beyond:
        report.problems.append(f"events after {last_seq} removed: a signed checkpoint covers event {max(beyond)}")
    return report
