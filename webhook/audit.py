"""The decision log: one audit event per admission decision.

Events go to stdout as JSON lines (for the cluster's log pipeline) and, when a store is configured,
into the store's hash-chained audit table (see :mod:`webhook.store.audit_chain`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import orjson

from webhook.admission import AdmissionRequest
from webhook.decision import Verdict
from webhook.findings import Reason


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
    """The security team's view of one decision; field names are a stable contract (docs/security.md)."""
    return {
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
    }


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


def audit_failure_verdict(verdict: Verdict, on_failure: str, detail: str) -> Verdict:
    """What the policy says happens when an event cannot be stored (``audit.onWriteFailure``)."""
    # Requests that are never blocked (deletes, unchanged images, exempt namespaces) stay allowed: a
    # broken audit store must not stop the cluster from scaling down or cleaning up.
    if on_failure == "allow" or not verdict.allowed or verdict.skipped:
        return verdict
    line = (f"[{Reason.STORE_UNAVAILABLE}] {verdict.subject or 'request'}: the decision could not be written to "
            f"the audit log ({detail}); denied because the policy requires an audit trail. Retry shortly")
    return replace(verdict, allowed=False, message=line)
