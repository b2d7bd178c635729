"""Verifying the tamper-evident decision log, and advancing its external anchor.

:func:`verify` walks the signed checkpoint chain, then the event chain together with the images
index, in bounded memory (pages and chunks, never the whole log), and names the first thing that
contradicts the hashes and signatures: an event edited, removed, reordered or put back; a column or
index row that no longer says what its event says; a checkpoint removed, altered or forged; events
that no checkpoint covers although one was due (``every`` events, ``seconds`` seconds); a log that
no longer contains a checkpoint published outside the database (an *anchor*).

:func:`advance_anchor` is what keeps such an anchor (the operator's ConfigMap, a file): it moves to
the newest checkpoint only when the log still holds the anchored one and every checkpoint after it
chains and verifies, so a truncated or rewritten log can never replace the anchor that exposes it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from webhook.core import keys
from webhook.store.audit_format import (
    GENESIS,
    Checkpoint,
    CheckpointKind,
    digests_of,
    legacy_checkpoint_message,
    parse_time,
    rfc3339,
)
from webhook.store.errors import AuditTampered
from webhook.store.sql import MAX_LOCAL_EVENT_CHARS, SqlStore, StoredEvent, recheck

__all__ = ["AnchorOutcome", "VerifyReport", "advance_anchor", "newest_anchor", "verify"]

GRACE_SECONDS = 60  # clock skew between replicas and the writer's own latency, at most this


@dataclass
class VerifyReport:
    events: int = 0
    checkpoints: int = 0
    checkpoints_verified: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Tampered(Exception):
    pass


def _span(first: int, last: int) -> str:
    return f"event {first}" if first == last else f"events {first}-{last}"


def _are(first: int, last: int) -> str:
    return "is" if first == last else "are"


def _checkpoints_span(first: int, last: int) -> str:
    return f"checkpoint {first}" if first == last else f"checkpoints {first}-{last}"


def anchor_missing(anchor: Checkpoint) -> str:
    return (f"signed checkpoint {anchor.seq} (event {anchor.event_seq}, {anchor.created_at}) of the anchor is not "
            "in the log: the log was truncated or emptied after the anchor was taken")


def anchor_differs(anchor: Checkpoint) -> str:
    return f"checkpoint {anchor.seq} differs from the anchor's signed copy: the checkpoint chain was rewritten"


def _check_signature(checkpoint: Checkpoint, table: dict[str, keys.VerifyingKey], what: str = "checkpoint") -> None:
    key = table.get(checkpoint.key_id)
    if key is None:
        raise _Tampered(f"{what} {checkpoint.seq} is signed by an unknown key {checkpoint.key_id[:12]}")
    if not checkpoint.signed_by(key):
        raise _Tampered(f"{what} {checkpoint.seq} (event {checkpoint.event_seq}) has an invalid signature")


def newest_anchor(anchors: Sequence[Checkpoint]) -> Checkpoint | None:
    """Of several published checkpoints, the one to hold the log to: the newest (it implies the rest)."""
    return max(anchors, key=lambda cp: cp.seq, default=None)


@dataclass
class _Chain:
    """What the first pass learns about the checkpoint chain."""

    count: int = 0
    last_seal: Checkpoint | None = None
    newest_prune: Checkpoint | None = None


def _walk_checkpoints(store: SqlStore, table: dict[str, keys.VerifyingKey] | None, anchors: Sequence[Checkpoint],
                      report: VerifyReport) -> _Chain:
    chain = _Chain()
    expected, prev = 1, GENESIS
    for cp in store.checkpoints():
        if cp.seq != expected:
            missing = _checkpoints_span(expected, cp.seq - 1)
            if expected == 1:
                raise _Tampered(f"{missing} removed: the checkpoint chain starts at checkpoint {cp.seq}")
            raise _Tampered(f"{missing} removed: the checkpoint chain jumps from checkpoint {expected - 1} "
                            f"to {cp.seq}")
        if not cp.content_ok():
            raise _Tampered(f"checkpoint {cp.seq} was altered: its content does not match its hash")
        if cp.prev_hash != prev:
            raise _Tampered(f"checkpoint {cp.seq} does not follow checkpoint {cp.seq - 1}: the checkpoint chain was "
                            "rewritten")
        if table is not None:
            _check_signature(cp, table)
            report.checkpoints_verified += 1
        if cp.kind == CheckpointKind.SEAL:
            last = chain.last_seal
            if last is not None and cp.event_seq <= last.event_seq:
                raise _Tampered(f"checkpoint {cp.seq} goes back to event {cp.event_seq}, after checkpoint {last.seq} "
                                f"covered event {last.event_seq}: the checkpoint chain was rewritten")
            if last is not None and cp.event_seq - last.event_seq > last.every:
                raise _Tampered(f"events {last.event_seq + 1}-{cp.event_seq} went without a signed checkpoint, "
                                f"although checkpoint {last.seq} required one within {last.every} events: a server "
                                "without --server-key appended to the log, or the log was rewritten")
            chain.last_seal = cp
        elif chain.newest_prune is None or cp.event_seq > chain.newest_prune.event_seq:
            chain.newest_prune = cp
        for anchor in anchors:
            if cp.seq == anchor.seq and cp.hash != anchor.hash:
                raise _Tampered(anchor_differs(anchor))
        expected, prev = cp.seq + 1, cp.hash
        chain.count += 1
    beyond = newest_anchor([a for a in anchors if a.seq > chain.count])
    if beyond is not None:
        raise _Tampered(anchor_missing(beyond))
    return chain


@dataclass
class _Images:
    """The images index, read alongside the events (both in event order)."""

    rows: Iterator[tuple[int, str]]
    current: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        self.current = next(self.rows, None)

    def orphans_before(self, seq: int) -> None:
        if self.current is not None and self.current[0] < seq:
            raise _Tampered(f"the images index names event {self.current[0]}, which is not in the log: a row was "
                            "inserted")

    def of(self, seq: int) -> tuple[str, ...]:
        found: list[str] = []
        while self.current is not None and self.current[0] == seq:
            found.append(self.current[1])
            self.current = next(self.rows, None)
        return tuple(found)


def _walk_events(store: SqlStore, chain: _Chain, start: tuple[int, str], report: VerifyReport,
                 now: datetime, keyed: bool, legacy_only: bool) -> None:
    start_seq, start_prev = start
    seals = (cp for cp in store.checkpoints() if cp.kind == CheckpointKind.SEAL and cp.event_seq >= start_seq)
    next_seal = next(seals, None)
    images = _Images(store.image_rows())
    expected_seq, expected_prev = start_seq, start_prev
    last_seal = chain.last_seal
    first_uncovered: tuple[int, str] | None = None
    for stored in store.events(max_event_chars=MAX_LOCAL_EVENT_CHARS):
        seq = stored.seq
        if seq < start_seq:
            marker = chain.newest_prune
            assert marker is not None
            raise _Tampered(f"event {seq} is in the log although checkpoint {marker.seq} marks the events up to "
                            f"{marker.event_seq} as pruned: it was put back")
        if seq > expected_seq:
            missing = _span(expected_seq, seq - 1)
            if expected_seq == 1:
                raise _Tampered(f"{missing} removed: the log starts at event {seq}, and no signed prune marker "
                                "covers the events before it")
            raise _Tampered(f"{missing} removed: the chain jumps from event {expected_seq - 1} to {seq}")
        if stored.prev_hash != expected_prev:
            raise _Tampered(f"event {seq} does not follow event {seq - 1}: the chain was reordered or an earlier event "
                            "was altered")
        if stored.text is None:
            raise _Tampered(f"event {seq} holds {stored.size} characters, more than any server writes: it was "
                            "inserted or altered (not read)")
        event = _checked(stored)
        images.orphans_before(seq)
        if images.of(seq) != digests_of(event):
            raise _Tampered(f"event {seq}: the images index does not match its hashed content (rows were edited, "
                            "deleted or inserted)")
        if next_seal is not None and next_seal.event_seq == seq:
            if next_seal.event_hash != stored.hash:
                raise _Tampered(f"event {seq} does not match signed checkpoint {next_seal.seq}: the chain was "
                                "rewritten from here or earlier")
            next_seal = next(seals, None)
        if first_uncovered is None and (last_seal is None or seq > last_seal.event_seq):
            first_uncovered = (seq, str(event.get("time", "")))
        report.events += 1
        expected_seq, expected_prev = seq + 1, stored.hash
    last_seq = expected_seq - 1
    if next_seal is not None:
        raise _Tampered(f"events after {last_seq} removed: signed checkpoint {next_seal.seq} covers event "
                        f"{next_seal.event_seq}")
    images.orphans_before(2**63)
    if first_uncovered is None:
        return
    first = first_uncovered[0]
    if last_seal is None:
        if keyed:
            raise _Tampered(f"{_span(first, last_seq)} {_are(first, last_seq)} not covered by any signed checkpoint: "
                            "the checkpoints were removed, or the server runs without --server-key")
        if not legacy_only:
            report.notes.append("no signed checkpoint in the log: only the chain's internal consistency was checked")
        return
    if last_seq - last_seal.event_seq >= last_seal.every:
        raise _Tampered(f"{_span(first, last_seq)} {_are(first, last_seq)} not covered by a signed checkpoint, "
                        f"although checkpoint {last_seal.seq} required one within {last_seal.every} events: newer "
                        "checkpoints were removed")
    made = parse_time(first_uncovered[1])
    if made is not None:
        due = made + timedelta(seconds=last_seal.seconds)
        if now > due + timedelta(seconds=min(last_seal.seconds, GRACE_SECONDS)):
            raise _Tampered(f"{_span(first, last_seq)} {_are(first, last_seq)} not covered by a signed checkpoint, "
                            f"although one was due by {rfc3339(due)}: newer checkpoints were removed, or the server "
                            "stopped before signing them (seal the log of a stopped server with "
                            "'promotion-gate audit checkpoint')")


def _checked(stored: StoredEvent) -> dict[str, Any]:
    try:
        return recheck(stored)
    except AuditTampered as exc:
        raise _Tampered(str(exc)) from exc


def _legacy(store: SqlStore, table: dict[str, keys.VerifyingKey] | None, start_seq: int, last_seq: int,
            report: VerifyReport) -> None:
    """Unchained checkpoints of logs written before checkpoints were chained: checked as they were then."""
    for cp in store.legacy_checkpoints():
        if table is not None:
            key = table.get(cp.key_id)
            if key is None:
                raise _Tampered(f"unchained checkpoint {cp.seq} is signed by an unknown key {cp.key_id[:12]}")
            try:
                signature = base64.b64decode(cp.signature)
            except ValueError:
                signature = b""
            if not key.verify(signature, legacy_checkpoint_message(cp.event_seq, cp.event_hash)):
                raise _Tampered(f"unchained checkpoint {cp.seq} (event {cp.event_seq}) has an invalid signature")
            report.checkpoints_verified += 1
        if cp.event_seq > last_seq and not cp.pruned_before:
            raise _Tampered(f"events after {last_seq} removed: a signed checkpoint covers event {cp.event_seq}")
        if start_seq <= cp.event_seq <= last_seq and store.event_hash(cp.event_seq) != cp.event_hash:
            raise _Tampered(f"event {cp.event_seq} does not match signed checkpoint: the chain was rewritten from "
                            "here or earlier")


def _legacy_start(store: SqlStore) -> tuple[int, str] | None:
    pruned = [cp for cp in store.legacy_checkpoints() if cp.pruned_before]
    if not pruned:
        return None
    newest = max(pruned, key=lambda cp: cp.event_seq)
    return newest.event_seq + 1, newest.event_hash


def verify(store: SqlStore, trusted: list[keys.VerifyingKey] | None = None, *,
           anchors: Sequence[Checkpoint] = (), now: datetime | None = None) -> VerifyReport:
    """Walk the checkpoint chain and the event chain; name the first thing that contradicts them.

    ``trusted``: the public keys whose checkpoint signatures count (None: signatures are not checked,
    and a log rewritten with recomputed hashes would pass). ``anchors``: checkpoints published outside
    the database; the log must still hold each of them, unchanged.
    """
    report = VerifyReport()
    table = {k.key_id: k for k in trusted} if trusted is not None else None
    now = now or datetime.now(UTC)
    try:
        for anchor in anchors:
            if not anchor.content_ok():
                raise _Tampered(f"the anchor's checkpoint {anchor.seq} was altered: its content does not match its "
                                "hash")
            if table is not None:
                _check_signature(anchor, table, "the anchor's checkpoint")
        chain = _walk_checkpoints(store, table, anchors, report)
        report.checkpoints = chain.count
        start = (1, GENESIS)
        if chain.newest_prune is not None:
            marker = chain.newest_prune
            start = (marker.event_seq + 1, marker.event_hash)
            report.notes.append(f"events up to {marker.event_seq} were pruned on {marker.created_at} "
                                f"(signed prune marker, checkpoint {marker.seq})")
        else:
            legacy_start = _legacy_start(store)
            if legacy_start is not None:
                start = legacy_start
                report.notes.append(f"events up to {legacy_start[0] - 1} were pruned at a checkpoint")
        # A log whose only checkpoints are unchained ones of an older version is judged as it was then.
        legacy_only = chain.count == 0 and next(store.legacy_checkpoints(page=1), None) is not None
        _walk_events(store, chain, start, report, now, keyed=table is not None and not legacy_only,
                     legacy_only=legacy_only)
        _legacy(store, table, start[0], start[0] - 1 + report.events, report)
        if legacy_only:
            report.notes.append("the log has only unchained checkpoints of an older version; the guarantees of "
                                "chained checkpoints start with the first event a current server writes")
    except _Tampered as exc:
        report.problems.append(str(exc))
        return report
    if table is None and report.checkpoints:
        report.notes.append("checkpoint signatures not checked (pass --key with the server's public key)")
    return report


@dataclass(frozen=True)
class AnchorOutcome:
    """What an anchor keeper should hold next.

    ``checkpoint``: the checkpoint to publish (None: the log has none yet). ``problem``: the log no
    longer extends the anchor; keep the old one and raise the alarm.
    """

    checkpoint: Checkpoint | None
    problem: str | None = None

    def advanced_from(self, anchored: Checkpoint | None) -> bool:
        if self.checkpoint is None or self.problem is not None:
            return False
        return anchored is None or self.checkpoint.seq > anchored.seq


def advance_anchor(store: SqlStore, trusted: list[keys.VerifyingKey], anchored: Checkpoint | None) -> AnchorOutcome:
    """Check that the log still extends ``anchored`` and return the newest checkpoint to anchor next.

    Only checkpoints are read (they are small): each one after the anchor must chain onto it and
    carry a valid signature by a ``trusted`` key.
    """
    table = {k.key_id: k for k in trusted}
    try:
        if anchored is not None:
            if not anchored.content_ok():
                raise _Tampered(f"the anchor's checkpoint {anchored.seq} was altered: its content does not match "
                                "its hash")
            _check_signature(anchored, table, "the anchor's checkpoint")
            in_log = store.checkpoint_at(anchored.seq)
            if in_log is None:
                raise _Tampered(anchor_missing(anchored))
            if in_log.hash != anchored.hash:
                raise _Tampered(anchor_differs(anchored))
        newest = anchored
        for cp in store.checkpoints(after=anchored.seq if anchored else 0):
            expected = newest.seq + 1 if newest else 1
            if cp.seq != expected:
                raise _Tampered(f"{_checkpoints_span(expected, cp.seq - 1)} removed: the checkpoint chain jumps to "
                                f"{cp.seq}")
            if not cp.content_ok() or cp.prev_hash != (newest.hash if newest else GENESIS):
                raise _Tampered(f"checkpoint {cp.seq} does not follow checkpoint {cp.seq - 1}: the checkpoint chain "
                                "was rewritten")
            _check_signature(cp, table)
            newest = cp
    except _Tampered as exc:
        return AnchorOutcome(anchored, str(exc))
    return AnchorOutcome(newest)
