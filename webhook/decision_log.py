"""The decision log: one audit event per admission decision.

Events go to stdout as JSON lines (for the cluster's log pipeline) and, when a store is configured,
into the store's hash-chained audit table (:class:`ChainedDecisionLog`, persisted by
:mod:`webhook.store.audit_chain`). What happens when an event cannot be written is the policy's
``audit.onWriteFailure``.
"""

from __future__ import annotations

import base64
import logging
import queue
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import orjson

from webhook.core import findings, keys
from webhook.core.audit_limits import bound_event
from webhook.core.decision import Verdict
from webhook.core.findings import Reason
from webhook.core.policy import OnWriteFailure, Policy
from webhook.core.review import AdmissionRequest
from webhook.metrics import Metrics
from webhook.store.audit_chain import canonical, chain_hash, checkpoint_message
from webhook.store.errors import StoreError, StoreUnavailable
from webhook.store.sql import AuditEntry, SqlStore

log = logging.getLogger("promotion_gate.decision_log")


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _object_name(request: AdmissionRequest) -> str:
    # request.name is filled in the validating phase; hand-made requests may carry it only in the object
    for obj in (request.object, request.old_object):
        metadata = obj.get("metadata") if obj else None
        if isinstance(metadata, Mapping):
            name = metadata.get("name") or metadata.get("generateName")
            if isinstance(name, str):
                return name
    return ""


def audit_event(request: AdmissionRequest, verdict: Verdict, policy_digest: str = "") -> dict[str, Any]:
    """The security team's view of one decision; field names are a stable contract (docs/security.md).

    Whoever reaches /validate chooses the request's contents, so the event is bounded
    (:func:`webhook.core.audit_limits.bound_event`: at most 64 KiB, cuts named in ``truncated``).
    """
    return bound_event({
        "time": now_rfc3339(),
        "uid": request.uid,
        "user": request.user.username,
        "groups": list(request.user.groups),
        "namespace": request.namespace,
        "kind": request.kind,
        "name": request.name or _object_name(request),
        "operation": request.operation,
        "subResource": request.sub_resource,
        "dryRun": request.dry_run,
        "environment": verdict.environment,
        "mode": str(verdict.mode),
        "allowed": verdict.allowed,
        "reasons": list(verdict.reasons),
        "findings": [f.line for f in verdict.findings],
        "images": [
            {
                "container": i.container,
                "field": i.field_path,
                "image": i.image,
                "repository": i.repository,
                "digest": i.digest,
                "records": list(i.record_ids),
                "exempt": i.exempt,
            }
            for i in verdict.images
        ],
        "breakGlass": verdict.break_glass_reason,
        "breakGlassRefused": verdict.break_glass_refused,
        "skipped": verdict.skipped,
        "policy": policy_digest,
    })


class DecisionLog(Protocol):
    def record(self, request: AdmissionRequest, verdict: Verdict) -> Verdict:
        """Log the decision; may turn an allow into a deny when the log cannot be written."""
        ...


class StdoutDecisionLog:
    """JSON lines on stdout: cheap, and what every cluster log pipeline already collects."""

    def __init__(self, stream: TextIO | None = None, policy_digest: str = "") -> None:
        self._stream = stream
        self._policy_digest = policy_digest
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = orjson.dumps({"msg": "admission decision", **event}, option=orjson.OPT_APPEND_NEWLINE)
        stream = self._stream or sys.stdout
        binary = getattr(stream, "buffer", None)
        if binary is not None:
            # One write of one whole line into the buffered binary stream, which has its own lock:
            # lines never interleave, and request threads do not queue behind each other's flush.
            binary.write(line)
            binary.flush()
        else:
            with self._lock:
                stream.write(line.decode())
                stream.flush()

    def record(self, request: AdmissionRequest, verdict: Verdict) -> Verdict:
        self.write(audit_event(request, verdict, self._policy_digest))
        return verdict


def audit_failure_verdict(verdict: Verdict, on_failure: OnWriteFailure, detail: str, *,
                          reason: Reason = Reason.STORE_UNAVAILABLE) -> Verdict:
    """What the policy says happens when an event cannot be stored (``audit.onWriteFailure``).

    ``reason`` is ``store-unavailable`` when the store did not answer, ``internal-error`` when the
    gate itself failed to write (a broken stdout, data the database refused).
    """
    # Requests that are never blocked (deletes, unchanged images, exempt namespaces) stay allowed: a
    # broken audit store must not stop the cluster from scaling down or cleaning up.
    if on_failure is OnWriteFailure.ALLOW or not verdict.allowed or verdict.skipped:
        return verdict
    message = findings.audit_unwritable(reason, verdict.subject or "request", detail)
    return replace(verdict, allowed=False, message=message)


class ChainedDecisionLog:
    """Appends each decision to the chain with group commit, and to stdout.

    Request threads hand their event to one writer thread and wait for its commit: under load the
    writer commits whatever has queued up in one transaction, so many decisions share one fsync
    while each request still learns whether its own event was stored (``audit.onWriteFailure``).
    """

    def __init__(self, store: SqlStore, policy: Policy, metrics: Metrics, *,
                 server_key: keys.SigningKey | None = None, stdout: StdoutDecisionLog | None = None,
                 max_batch: int = 256) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._key = server_key
        self._stdout = stdout or StdoutDecisionLog()
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
                    done.set_exception(exc)
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
        self._store.add_checkpoint(seq, event_hash, now_rfc3339(), self._key.key_id, signature)

    def record(self, request: AdmissionRequest, verdict: Verdict) -> Verdict:
        event = audit_event(request, verdict, self._policy.digest)
        started = time.perf_counter()
        try:
            self.append(event, timeout=self._policy.store_timeout_seconds)
        except Exception as exc:  # whatever failed, the policy decides what the request gets
            self._metrics.audit_errors.inc()
            log.error("audit event %s could not be stored: %s", request.uid, exc)
            # A store that fails is an outage the operator fixes in the database; anything else is a fault
            # of the gate itself, and must not send anyone to chase the database.
            outage = isinstance(exc, StoreError)
            verdict = audit_failure_verdict(verdict, self._policy.audit_on_write_failure,
                                            "store error" if outage else type(exc).__name__,
                                            reason=Reason.STORE_UNAVAILABLE if outage else Reason.INTERNAL_ERROR)
            event.update(allowed=verdict.allowed, auditStoreError=str(exc)[:200])
        finally:
            self._metrics.audit_latency.observe(time.perf_counter() - started)
        self._stdout.write(event)
        return verdict
