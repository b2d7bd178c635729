"""The decision log: one audit event per admission decision.

Events go to stdout as JSON lines (for the cluster's log pipeline) and, when a store is configured,
into the store's hash-chained audit table (:class:`ChainedDecisionLog`, persisted by
:mod:`webhook.store.sql`, verified by :mod:`webhook.store.audit_chain`). What happens when an event
cannot be written is the policy's ``audit.onWriteFailure``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
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
from webhook.store.audit_format import Checkpoint, PreparedEvent, Sealer, prepare
from webhook.store.errors import StoreError, StoreUnavailable
from webhook.store.sql import SqlStore

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
        self.write_line({"msg": "admission decision", **event})

    def write_line(self, document: Mapping[str, Any]) -> None:
        line = orjson.dumps(document, option=orjson.OPT_APPEND_NEWLINE)
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


SMALL_EVENT_CHARS = 64 * 1024  # an ordinary decision is a few KiB; larger ones wait in their own lane
LARGE_BUDGET_CHARS = 1024 * 1024  # large-event text per transaction (at least one large event)
MAX_EVENT_CHARS = 8 * 1024 * 1024  # refused beyond this (that event alone): one event never stalls the writer
MAX_BATCH = 256
SEAL_CHECK_SECONDS = 1.0  # how often an idle writer checks whether a time-based checkpoint is due


class AuditEventTooLarge(ValueError):
    """An event the writer refuses to append (it alone fails; the policy decides the request)."""


@dataclass
class _Pending:
    event: PreparedEvent
    done: Future[int]


class _Lanes:
    """The writer's queue: ordinary events first, large ones up to a size budget per transaction.

    Whatever large events are queued, an ordinary event waits for at most one transaction holding
    ``LARGE_BUDGET_CHARS`` of them (or a single larger one), never for all of them.
    """

    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._ready = threading.Condition()
        self._small: deque[_Pending] = deque()
        self._large: deque[_Pending] = deque()

    def put(self, item: _Pending) -> None:
        with self._ready:
            (self._small if item.event.size <= SMALL_EVENT_CHARS else self._large).append(item)
            self._ready.notify()

    def take(self, timeout: float | None) -> list[_Pending]:
        """The next group to commit (claimed: requests that gave up are skipped), or [] after ``timeout``."""
        with self._ready:
            if not self._small and not self._large:
                self._ready.wait(timeout)
            group: list[_Pending] = []
            while self._small and len(group) < self._max_batch:
                self._claim(self._small.popleft(), group)
            used, large = 0, 0
            while self._large and (large == 0 or used + self._large[0].event.size <= LARGE_BUDGET_CHARS):
                item = self._large.popleft()
                if self._claim(item, group):
                    used, large = used + item.event.size, large + 1
            return group

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    @staticmethod
    def _claim(item: _Pending, group: list[_Pending]) -> bool:
        if not item.done.set_running_or_notify_cancel():
            return False  # its request timed out and withdrew it: it is never written
        group.append(item)
        return True


class ChainedDecisionLog:
    """Appends each decision to the chain with group commit, and to stdout.

    Request threads serialise their event (:func:`~webhook.store.audit_format.prepare`) and hand it
    to one writer thread, then wait for its commit: under load the writer commits whatever has queued
    up in one transaction, so many decisions share one fsync while each request still learns whether
    its own event was stored (``audit.onWriteFailure``). With the server's key, the writer also signs
    the checkpoints that fall due (``audit.checkpointEvery`` events, ``audit.checkpointSeconds``
    seconds) in the same transaction, and publishes each one on stdout.
    """

    def __init__(self, store: SqlStore, policy: Policy, metrics: Metrics, *,
                 server_key: keys.SigningKey | None = None, stdout: StdoutDecisionLog | None = None,
                 max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._sealer = Sealer(server_key, policy.audit_checkpoint_every, policy.audit_checkpoint_seconds) \
            if server_key is not None else None
        self._stdout = stdout or StdoutDecisionLog()
        self._lanes = _Lanes(max_batch)
        self._uncovered = self._sealer is not None  # unknown at start: events of a crashed process may wait
        self._newest_event = 0  # what this process wrote last: the chain never goes below it
        self._newest_checkpoint = 0
        self._closed = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def append(self, event: dict[str, object], timeout: float | None = None) -> int:
        prepared = prepare(event)
        if prepared.size > MAX_EVENT_CHARS:
            raise AuditEventTooLarge(f"audit event of {prepared.size} characters is larger than the audit log's "
                                     f"limit of {MAX_EVENT_CHARS}")
        done: Future[int] = Future()
        self._lanes.put(_Pending(prepared, done))
        try:
            return done.result(timeout=timeout)
        except FutureTimeout as exc:
            # Withdrawn if the writer has not taken it yet, so a denied request leaves no "allowed" event.
            done.cancel()
            raise StoreUnavailable("audit write timed out") from exc

    def _write_loop(self) -> None:
        while not self._closed.is_set():
            group = self._lanes.take(SEAL_CHECK_SECONDS if self._uncovered else None)
            if not group:
                if not self._closed.is_set():
                    self._seal_if_due()
                continue
            try:
                outcome = self._store.append_audit([item.event for item in group], self._sealer)
            except Exception as exc:  # every waiter learns of the failure; nothing is dropped silently
                for item in group:
                    item.done.set_exception(exc)
                continue
            newest = 0
            for result, item in zip(outcome.results, group, strict=True):
                if isinstance(result, Exception):
                    item.done.set_exception(result)
                else:
                    item.done.set_result(result.seq)
                    newest = max(newest, result.seq)
            self._check_progress([r.seq for r in outcome.results if not isinstance(r, Exception)],
                                 outcome.checkpoints)
            self._published(outcome.checkpoints)
            if self._sealer is not None and newest:
                self._uncovered = not outcome.checkpoints or outcome.checkpoints[-1].event_seq < newest

    def _check_progress(self, stored: list[int], checkpoints: list[Checkpoint]) -> None:
        """The chain only grows: finding it below what this process wrote means rows were deleted."""
        regressed = []
        if stored and min(stored) <= self._newest_event:
            regressed.append(f"event {min(stored)} was written after this server had written event "
                             f"{self._newest_event}")
        if checkpoints and checkpoints[0].seq <= self._newest_checkpoint:
            regressed.append(f"checkpoint {checkpoints[0].seq} was signed after this server had signed checkpoint "
                             f"{self._newest_checkpoint}")
        if regressed:
            self._metrics.audit_regressions.inc()
            log.error("audit log TAMPERED: the chain went backwards (%s): events or checkpoints were removed from "
                      "the database; run 'promotion-gate audit verify --anchor'", "; ".join(regressed))
        self._newest_event = max([self._newest_event, *stored])
        self._newest_checkpoint = max([self._newest_checkpoint, *(c.seq for c in checkpoints)])

    def _seal_if_due(self, *, force: bool = False) -> None:
        if self._sealer is None:
            return
        try:
            checkpoint, self._uncovered = self._store.seal(self._sealer, force=force)
        except StoreError as exc:
            self._metrics.audit_errors.inc()
            log.error("audit checkpoint failed: %s", exc)
            return
        self._check_progress([], [checkpoint] if checkpoint else [])
        self._published([checkpoint] if checkpoint else [])

    def _published(self, checkpoints: list[Checkpoint]) -> None:
        for checkpoint in checkpoints:
            try:
                self._stdout.write_line(checkpoint.to_json())
            except Exception as exc:  # the checkpoint is stored; only its copy on stdout is missing
                log.error("checkpoint %s could not be written to stdout: %s", checkpoint.seq, exc)

    def close(self) -> None:
        """At shutdown: sign a checkpoint over events that none covers yet, so the log stays sealed.

        The writer finishes the group it holds and stops; decisions after this are not stored.
        """
        self._closed.set()
        self._lanes.wake()
        self._writer.join(timeout=10)
        if self._uncovered:
            self._seal_if_due(force=True)

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
