"""The tamper-evident decision log's persistence: the hash chain, checkpoints, and their verification.

Each event's hash covers its sequence number, the previous event's hash and its own canonical JSON,
so editing, deleting or reordering any stored event breaks the chain at that event. Someone able to
rewrite the whole table could recompute every hash; signed checkpoints (made with the server's key,
which the database never holds) catch that, and let old events be pruned without breaking the chain.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

import orjson

from webhook.core import keys
from webhook.store.sql import SqlStore

GENESIS = "0" * 64


def canonical(event: dict[str, object]) -> str:
    # Compact, sorted keys, UTF-8. Verification hashes the stored text itself, never a re-serialisation.
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS).decode()


def chain_hash(seq: int, prev_hash: str, event_json: str) -> str:
    return hashlib.sha256(f"{seq}\n{prev_hash}\n{event_json}".encode()).hexdigest()


def checkpoint_message(event_seq: int, event_hash: str) -> bytes:
    return f"promotion-gate audit checkpoint v1\n{event_seq}\n{event_hash}".encode()


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
