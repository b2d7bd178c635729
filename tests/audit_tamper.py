"""The audit tamper corpus: what someone with write access to the database does, and what `audit verify` says.

Each case starts from a copy of one log written by a real server (``tests/test_audit_tamper.py``),
drops the append-only triggers (as the database's owner can), changes the tables, and names the
verdict of ``audit verify --key`` alone and with an anchor kept outside the database (the server's
own stdout log). ``None`` means the change is not detectable with that evidence: the limits that
docs/security.md states. The table is shared with the test of that page, so the page's figures are
this table's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from webhook.core import keys
from webhook.store import SqlStore, open_store
from webhook.store.audit_format import (
    GENESIS,
    Checkpoint,
    CheckpointKind,
    Sealer,
    canonical,
    chain_hash,
    columns_of,
    digests_of,
)

EVENTS = 22
EVERY = 5  # the golden log's audit.checkpointEvery; its seals cover events 1, 6, 11, 16, 21 and 22 (at shutdown)
AUDIT_TABLES = ("audit_events", "audit_images", "audit_checkpoints", "audit_checkpoint_chain")


@dataclass
class Golden:
    """What the tests know about the untouched log (the attacker knows it too)."""

    server_key: keys.SigningKey
    outsider_key: keys.SigningKey
    checkpoints: list[Checkpoint]

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    def words(self) -> dict[str, str]:
        newest = self.newest
        return {"anchor": f"signed checkpoint {newest.seq} (event {newest.event_seq}, {newest.created_at})",
                "outsider": self.outsider_key.key_id[:12], "newest": str(newest.seq)}


@dataclass
class Attacker:
    """Full rights on the database, no signing key (unless a case hands it the server's)."""

    store: SqlStore
    golden: Golden | None = None

    def known(self) -> Golden:
        assert self.golden is not None
        return self.golden

    def sql(self, *statements: str, **params: Any) -> None:
        with self.store.write_engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement), params)

    def events(self) -> list[dict[str, Any]]:
        return [{"seq": e.seq, "text": e.text, "prev": e.prev_hash, "hash": e.hash} for e in self.store.events()]

    def rewrite(self, from_seq: int, change: Callable[[dict[str, Any]], None], *, then: str | None = None,
                resign: bool = False) -> None:
        """Change one event and recompute every later hash, columns and index rows included.

        ``then``: a statement to run afterwards; ``resign``: sign new checkpoints with the server's key.
        """
        events = self.events()
        prev = events[from_seq - 2]["hash"] if from_seq > 1 else GENESIS
        with self.store.write_engine.begin() as conn:
            for stored in events[from_seq - 1:]:
                event = json.loads(stored["text"])
                if stored["seq"] == from_seq:
                    change(event)
                text = canonical(event)
                digest = chain_hash(stored["seq"], prev, text)
                c = columns_of(event)
                conn.execute(sa.text("UPDATE audit_events SET event = :e, prev_hash = :p, hash = :h, time = :t, "
                                     "uid = :u, namespace = :n, username = :user, allowed = :a, reasons = :r "
                                     "WHERE seq = :s"),
                             {"e": text, "p": prev, "h": digest, "t": c.time, "u": c.uid, "n": c.namespace,
                              "user": c.username, "a": c.allowed, "r": c.reasons, "s": stored["seq"]})
                conn.execute(sa.text("DELETE FROM audit_images WHERE event_seq = :s"), {"s": stored["seq"]})
                for d in digests_of(event):
                    conn.execute(sa.text("INSERT INTO audit_images (event_seq, digest) VALUES (:s, :d)"),
                                 {"s": stored["seq"], "d": d})
                prev = digest
        if then is not None:
            self.sql(then)
        if resign:
            self.resign(self.known().server_key)

    def resign(self, key: keys.SigningKey) -> None:
        """Drop every checkpoint and sign new ones over the chain as it is now, on the server's schedule."""
        self.sql("DELETE FROM audit_checkpoint_chain")
        sealer = Sealer(key, EVERY, 3600)
        events = self.events()
        head: Checkpoint | None = None
        last_sealed = 0
        for stored in events:
            if head is None or stored["seq"] - last_sealed >= EVERY or stored["seq"] == events[-1]["seq"]:
                head = self.append_checkpoint(sealer, CheckpointKind.SEAL, stored["seq"], stored["hash"], head)
                last_sealed = stored["seq"]

    def head(self) -> Checkpoint | None:
        return self.store.checkpoint_head()

    def append_checkpoint(self, sealer: Sealer, kind: str, event_seq: int, event_hash: str,
                          head: Checkpoint | None = None, signature: Checkpoint | None = None) -> Checkpoint:
        head = head or self.head()
        checkpoint = sealer.sign(seq=head.seq + 1 if head else 1, prev_hash=head.hash if head else GENESIS, kind=kind,
                                 event_seq=event_seq, event_hash=event_hash, created_at="2026-01-01T00:00:00.000000Z")
        if signature is not None:  # claim to be signed by that checkpoint's key, with its signature
            checkpoint = Checkpoint(**{**checkpoint.__dict__, "signature": signature.signature,
                                       "key_id": signature.key_id})
        self.sql("INSERT INTO audit_checkpoint_chain (seq, prev_hash, kind, event_seq, event_hash, created_at, every, "
                 "seconds, key_id, signature, hash) VALUES (:seq, :prev_hash, :kind, :event_seq, :event_hash, "
                 ":created_at, :every, :seconds, :key_id, :signature, :hash)", **checkpoint.__dict__)
        return checkpoint

    def hash_of(self, seq: int) -> str:
        found = self.store.event_hash(seq)
        assert found is not None
        return found


def attacker_on(url: str, golden: Golden | None = None) -> Attacker:
    """The database's owner: the append-only triggers are no obstacle."""
    store = open_store(url)
    with store.write_engine.begin() as conn:
        if store.dialect == "sqlite":
            for (name,) in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").all():
                conn.exec_driver_sql(f"DROP TRIGGER {name}")
        else:
            for table in AUDIT_TABLES:
                conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    return Attacker(store, golden)


@dataclass(frozen=True)
class Case:
    tamper: Callable[[Attacker], object]
    alone: str | None  # the verdict of 'audit verify --key' (None: not detectable without an anchor)
    anchored: str | None  # with '--anchor' (the server's stdout log); None: not detectable at all


def _swap_events(a: Attacker) -> None:
    a.sql("UPDATE audit_images SET event_seq = 100 WHERE event_seq = 8",
          "UPDATE audit_images SET event_seq = 8 WHERE event_seq = 9",
          "UPDATE audit_images SET event_seq = 9 WHERE event_seq = 100",
          "UPDATE audit_events SET seq = 100 WHERE seq = 8", "UPDATE audit_events SET seq = 8 WHERE seq = 9",
          "UPDATE audit_events SET seq = 9 WHERE seq = 100")


def _one_hash(a: Attacker) -> None:
    """Edit event 7 and recompute its own hash (the next event still names the old one)."""
    (stored,) = [e for e in a.events() if e["seq"] == 7]
    event = json.loads(stored["text"])
    event["allowed"] = False
    text = canonical(event)
    a.sql("UPDATE audit_events SET event = :e, hash = :h, allowed = :a WHERE seq = 7", e=text,
          h=chain_hash(7, stored["prev"], text), a=False)


def _flip(event: dict[str, Any]) -> None:
    event["allowed"] = not event["allowed"]


def _forge_prune(signature_from: str) -> Callable[[Attacker], None]:
    def tamper(a: Attacker) -> None:
        marker_hash = a.hash_of(10)
        a.sql("DELETE FROM audit_images WHERE event_seq <= 10", "DELETE FROM audit_events WHERE seq <= 10")
        if signature_from == "outsider":
            a.append_checkpoint(Sealer(a.known().outsider_key, EVERY, 3600), CheckpointKind.PRUNE, 10, marker_hash)
        else:  # the signature of a genuine checkpoint, copied
            a.append_checkpoint(Sealer(a.known().outsider_key, EVERY, 3600), CheckpointKind.PRUNE, 10, marker_hash,
                                signature=a.known().newest)
    return tamper


def _append_forged_event(a: Attacker) -> None:
    last = a.events()[-1]
    event = json.loads(last["text"])
    event.update(seq=last["seq"] + 1, uid="forged", user="nobody@example.com")
    text = canonical(event)
    c = columns_of(event)
    a.sql("INSERT INTO audit_events (seq, time, uid, namespace, username, allowed, reasons, event, prev_hash, hash) "
          "VALUES (:s, :t, :u, :n, :user, :a, :r, :e, :p, :h)", s=last["seq"] + 1, t=c.time, u=c.uid, n=c.namespace,
          user=c.username, a=c.allowed, r=c.reasons, e=text, p=last["hash"], h=chain_hash(last["seq"] + 1,
                                                                                          last["hash"], text))
    for d in digests_of(event):
        a.sql("INSERT INTO audit_images (event_seq, digest) VALUES (:s, :d)", s=last["seq"] + 1, d=d)


def _giant_event(a: Attacker) -> None:
    last = a.events()[-1]
    text = "x" * GIANT
    a.sql("INSERT INTO audit_events (seq, time, uid, namespace, username, allowed, reasons, event, prev_hash, hash) "
          "VALUES (:s, 't', 'u', 'n', 'user', :a, '', :e, :p, :h)", s=last["seq"] + 1, a=False, e=text,
          p=last["hash"], h=chain_hash(last["seq"] + 1, last["hash"], text))


GIANT = 64 * 1024 * 1024 + 1  # more than any server writes: verify reports it without reading it

ANCHOR_MISSING = ("{anchor} of the anchor is not in the log: the log was truncated or emptied after the anchor "
                  "was taken")
NOT_SEALED = "are not covered by any signed checkpoint: the checkpoints were removed, or the server runs without --server-key"
INDEX = "the images index does not match its hashed content (rows were edited, deleted or inserted)"

CORPUS: dict[str, Case] = {
    "edit an event": Case(
        lambda a: a.sql("UPDATE audit_events SET event = replace(event, :was, :now) WHERE seq = 7",
                        was='"allowed":true', now='"allowed":false'),
        "event 7 was altered: its content does not match its hash", "="),
    "edit an event and recompute its own hash": Case(
        _one_hash, "event 8 does not follow event 7: the chain was reordered or an earlier event was altered", "="),
    "delete an event": Case(
        lambda a: a.sql("DELETE FROM audit_images WHERE event_seq = 5", "DELETE FROM audit_events WHERE seq = 5"),
        "event 5 removed: the chain jumps from event 4 to 6", "="),
    "reorder two events": Case(
        _swap_events, "event 8 does not follow event 7: the chain was reordered or an earlier event was altered", "="),
    "delete the oldest events": Case(
        lambda a: a.sql("DELETE FROM audit_images WHERE event_seq <= 3", "DELETE FROM audit_events WHERE seq <= 3"),
        "events 1-3 removed: the log starts at event 4, and no signed prune marker covers the events before it", "="),
    "truncate the tail": Case(
        lambda a: a.sql("DELETE FROM audit_images WHERE event_seq > 18", "DELETE FROM audit_events WHERE seq > 18"),
        "events after 18 removed: signed checkpoint 5 covers event 21", "="),
    "truncate the tail with its checkpoints, more than checkpointEvery left": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 3", "DELETE FROM audit_images WHERE "
                        "event_seq > 14", "DELETE FROM audit_events WHERE seq > 14"),
        "events 7-14 are not covered by a signed checkpoint, although checkpoint 2 required one within 5 events: "
        "newer checkpoints were removed", ANCHOR_MISSING),
    "truncate the tail with its checkpoints, fewer than checkpointEvery left": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 3", "DELETE FROM audit_images WHERE "
                        "event_seq > 9", "DELETE FROM audit_events WHERE seq > 9"),
        None, ANCHOR_MISSING),
    "truncate the tail at a checkpoint": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 4", "DELETE FROM audit_images WHERE "
                        "event_seq > 11", "DELETE FROM audit_events WHERE seq > 11"),
        None, ANCHOR_MISSING),
    "rewrite the chain, checkpoints kept": Case(
        lambda a: a.rewrite(3, _flip),
        "event 6 does not match signed checkpoint 2: the chain was rewritten from here or earlier", "="),
    "rewrite the chain, later checkpoints dropped": Case(
        lambda a: a.rewrite(13, _flip, then="DELETE FROM audit_checkpoint_chain WHERE seq >= 4"),
        "events 12-22 are not covered by a signed checkpoint, although checkpoint 3 required one within 5 events: "
        "newer checkpoints were removed", ANCHOR_MISSING),
    "rewrite the chain, every checkpoint dropped": Case(
        lambda a: a.rewrite(3, _flip, then="DELETE FROM audit_checkpoint_chain"),
        f"events 1-22 {NOT_SEALED}", ANCHOR_MISSING),
    "rewrite the chain and re-sign it with the server key": Case(
        lambda a: a.rewrite(3, _flip, resign=True),
        None, "checkpoint {newest} differs from the anchor's signed copy: the checkpoint chain was rewritten"),
    "drop every checkpoint": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain"), f"events 1-22 {NOT_SEALED}", ANCHOR_MISSING),
    "delete a checkpoint": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq = 3"),
        "checkpoint 3 removed: the checkpoint chain jumps from checkpoint 2 to 4", "="),
    "delete the first checkpoint": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq = 1"),
        "checkpoint 1 removed: the checkpoint chain starts at checkpoint 2", "="),
    "delete the newest checkpoint": Case(
        lambda a: a.sql("DELETE FROM audit_checkpoint_chain WHERE seq = 6"), None, ANCHOR_MISSING),
    "alter a checkpoint": Case(
        lambda a: a.sql("UPDATE audit_checkpoint_chain SET event_hash = :h WHERE seq = 2", h=a.hash_of(5)),
        "checkpoint 2 was altered: its content does not match its hash", "="),
    "reorder two checkpoints": Case(
        lambda a: a.sql("UPDATE audit_checkpoint_chain SET seq = 100 WHERE seq = 2",
                        "UPDATE audit_checkpoint_chain SET seq = 2 WHERE seq = 3",
                        "UPDATE audit_checkpoint_chain SET seq = 3 WHERE seq = 100"),
        "checkpoint 2 was altered: its content does not match its hash", "="),
    "forge a checkpoint with another key": Case(
        lambda a: a.append_checkpoint(Sealer(a.known().outsider_key, EVERY, 3600), CheckpointKind.SEAL, 22,
                                      a.hash_of(22)),
        "checkpoint 7 is signed by an unknown key {outsider}", "="),
    "forge a prune marker with another key": Case(
        _forge_prune("outsider"), "checkpoint 7 is signed by an unknown key {outsider}", "="),
    "forge a prune marker with a copied signature": Case(
        _forge_prune("copied"), "checkpoint 7 (event 10) has an invalid signature", "="),
    "edit the user column": Case(
        lambda a: a.sql("UPDATE audit_events SET username = 'alice' WHERE seq = 7"),
        "event 7: its username column does not match its hashed content", "="),
    "edit the namespace column": Case(
        lambda a: a.sql("UPDATE audit_events SET namespace = 'team-x' WHERE seq = 7"),
        "event 7: its namespace column does not match its hashed content", "="),
    "edit the reasons column": Case(
        lambda a: a.sql("UPDATE audit_events SET reasons = 'mutable-tag' WHERE seq = 7"),
        "event 7: its reasons column does not match its hashed content", "="),
    "edit the allowed column": Case(
        lambda a: a.sql("UPDATE audit_events SET allowed = :no WHERE seq = 7", no=False),
        "event 7: its allowed column does not match its hashed content", "="),
    "edit the time column": Case(
        lambda a: a.sql("UPDATE audit_events SET time = '2000-01-01T00:00:00.000000Z' WHERE seq = 7"),
        "event 7: its time column does not match its hashed content", "="),
    "edit the uid column": Case(
        lambda a: a.sql("UPDATE audit_events SET uid = 'other' WHERE seq = 7"),
        "event 7: its uid column does not match its hashed content", "="),
    "delete an images index row": Case(
        lambda a: a.sql("DELETE FROM audit_images WHERE event_seq = 6"), f"event 6: {INDEX}", "="),
    "edit an images index row": Case(
        lambda a: a.sql("UPDATE audit_images SET digest = :d WHERE event_seq = 6", d="sha256:" + "f" * 64),
        f"event 6: {INDEX}", "="),
    "insert an images index row": Case(
        lambda a: a.sql("INSERT INTO audit_images (event_seq, digest) VALUES (7, :d)", d="sha256:" + "f" * 64),
        f"event 7: {INDEX}", "="),
    "insert an images index row for no event": Case(
        lambda a: a.sql("INSERT INTO audit_images (event_seq, digest) VALUES (999, :d)", d="sha256:" + "f" * 64),
        "the images index names event 999, which is not in the log: a row was inserted", "="),
    "empty the events, keep the checkpoints": Case(
        lambda a: a.sql("DELETE FROM audit_images", "DELETE FROM audit_events"),
        "events after 0 removed: signed checkpoint 1 covers event 1", "="),
    "empty every audit table": Case(
        lambda a: a.sql(*(f"DELETE FROM {table}" for table in AUDIT_TABLES)), None, ANCHOR_MISSING),
    "append a forged event after the newest checkpoint": Case(_append_forged_event, None, None),
    "insert an event too large to read": Case(
        _giant_event, f"event 23 holds {GIANT} characters, more than any server writes: it was inserted or altered "
                      "(not read)", "="),
}


def expected(case: Case, golden: Golden, *, anchored: bool) -> str | None:
    verdict = case.alone if not anchored or case.anchored == "=" else case.anchored
    return None if verdict is None else verdict.format(**golden.words())


def caught(corpus: dict[str, Case]) -> tuple[int, int, int]:
    """(caught by 'verify --key' alone, caught with an anchor, total)."""
    return (sum(c.alone is not None for c in corpus.values()),
            sum(c.alone is not None or c.anchored not in (None, "=") for c in corpus.values()), len(corpus))


def write_anchor_lines(path: Path, checkpoints: list[Checkpoint]) -> None:
    path.write_text("".join(json.dumps(cp.to_json()) + "\n" for cp in checkpoints))
