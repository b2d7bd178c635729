"""The decision log's formats: the chained event text, the indexed columns, and signed checkpoints.

Everything here is a pure function of its arguments, shared by the writer (:mod:`webhook.store.sql`),
``audit verify`` (:mod:`webhook.store.audit_chain`), the queries that re-check what they return, and
the external anchors (the stdout log, the operator's ConfigMap, a file).

**Events.** Each stored event is its canonical JSON (sorted keys, no spaces, ``seq`` included). Its
hash covers its sequence number, the previous event's hash and that text, so editing, deleting or
reordering a stored event breaks the chain there.

**Columns.** The columns that queries filter on (``time``, ``uid``, ``namespace``, ``username``,
``allowed``, ``reasons``) and the images index are *derived* from the hashed event by
:func:`columns_of` and :func:`digests_of`: bounded so that the database never refuses a
well-formed event, and re-derived by ``verify`` and by every query, so that an edited column or
index row is caught instead of silently hiding an event.

**Checkpoints** are a second, signed hash chain: each names the previous checkpoint's hash, the
event it covers and its hash, when it was made, and the schedule it promises (the next one is due
within ``every`` events and ``seconds`` seconds). Deleting, reordering or forging one breaks that
chain, and a missing checkpoint where one was due is visible.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from webhook.core import keys

GENESIS = "0" * 64
ANCHOR_MESSAGE = "audit checkpoint"  # the "msg" of a published checkpoint (stdout line, ConfigMap, file)

# Column bounds: the database's own limits (PostgreSQL refuses longer values; SQLite would store them).
UID_CHARS = 128
NAMESPACE_CHARS = 253
USERNAME_CHARS = 512
REASONS_CHARS = 512
TIME_CHARS = 40
DIGEST_CHARS = 140
HASH_SUFFIX = 17  # "#" and 16 hex digits of SHA-256, appended when a value had to be changed


class CheckpointKind:
    """What a checkpoint is for. A plain string in the database and in the signed message."""

    SEAL = "seal"  # covers every event up to its event; the schedule (every/seconds) applies to seals
    PRUNE = "prune"  # events up to its event were deleted by 'audit prune'; the log continues after it
    ALL = (SEAL, PRUNE)


def canonical(event: Mapping[str, object]) -> str:
    # Compact, sorted keys, UTF-8. Verification hashes the stored text itself, never a re-serialisation.
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS).decode()


def chain_hash(seq: int, prev_hash: str, event_json: str) -> str:
    return hashlib.sha256(f"{seq}\n{prev_hash}\n{event_json}".encode("utf-8", "surrogatepass")).hexdigest()


def legacy_checkpoint_message(event_seq: int, event_hash: str) -> bytes:
    """What version 1 signed: unchained checkpoints (still verified in logs that have them)."""
    return f"promotion-gate audit checkpoint v1\n{event_seq}\n{event_hash}".encode()


# --- events ---------------------------------------------------------------------------------------


def column_text(value: str, limit: int) -> str:
    """``value`` as the database can always store it: at most ``limit`` characters, no NUL, valid UTF-8.

    A value that had to be changed ends in ``#`` and 16 hex digits of its SHA-256, so distinct long
    values stay distinct. Queries apply the same function to what they look for, then compare the
    event's own, complete value.
    """
    clean = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if clean == value and len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[:limit - HASH_SUFFIX]}#{digest}"


@dataclass(frozen=True)
class AuditColumns:
    """The queried columns of one event, as stored: derived from the event, never set on their own."""

    time: str
    uid: str
    namespace: str
    username: str
    allowed: bool
    reasons: str

    NAMES = ("time", "uid", "namespace", "username", "allowed", "reasons")

    def differing(self, other: AuditColumns) -> str | None:
        """The name of the first column whose value differs, or None."""
        return next((name for name in self.NAMES if getattr(self, name) != getattr(other, name)), None)


def _text_field(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    return value if isinstance(value, str) else "" if value is None else str(value)


def reasons_of(event: Mapping[str, Any]) -> list[str]:
    reasons = event.get("reasons")
    return [str(r) for r in reasons] if isinstance(reasons, list) else []


def columns_of(event: Mapping[str, Any]) -> AuditColumns:
    return AuditColumns(
        time=column_text(_text_field(event, "time"), TIME_CHARS),
        uid=column_text(_text_field(event, "uid"), UID_CHARS),
        namespace=column_text(_text_field(event, "namespace"), NAMESPACE_CHARS),
        username=column_text(_text_field(event, "user"), USERNAME_CHARS),
        allowed=event.get("allowed") is True,
        reasons=column_text(",".join(reasons_of(event)), REASONS_CHARS),
    )


def image_digests(event: Mapping[str, Any]) -> list[str]:
    """Every digest the event's images name, as written in the event."""
    images = event.get("images")
    if not isinstance(images, list):
        return []
    return [str(i["digest"]) for i in images if isinstance(i, Mapping) and i.get("digest")]


def digests_of(event: Mapping[str, Any]) -> tuple[str, ...]:
    """The images index rows of one event: its distinct digests, bounded, in order."""
    return tuple(sorted({column_text(d, DIGEST_CHARS) for d in image_digests(event)}))


@dataclass(frozen=True)
class PreparedEvent:
    """An event serialised once, by the thread that made it, before its place in the chain is known.

    The writer only splices in ``seq`` (:meth:`text`) and hashes: serialising a large event never
    holds up the single writer.
    """

    head: str  # the sorted members before "seq", without braces
    tail: str  # the sorted members after "seq"
    columns: AuditColumns
    digests: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tail) + 32

    def text(self, seq: int) -> str:
        members = [part for part in (self.head, f'"seq":{seq}', self.tail) if part]
        return "{" + ",".join(members) + "}"


def prepare(event: Mapping[str, Any]) -> PreparedEvent:
    """Serialise ``event`` (whose ``seq`` the writer assigns) into its canonical parts.

    ``text(seq)`` equals ``canonical({**event, "seq": seq})``: keys sort by code point, so "seq"
    lands between the members that sort before it and those after it.
    """
    before = {k: v for k, v in event.items() if k < "seq"}
    after = {k: v for k, v in event.items() if k > "seq"}
    head = orjson.dumps(before, option=orjson.OPT_SORT_KEYS).decode()[1:-1]
    tail = orjson.dumps(after, option=orjson.OPT_SORT_KEYS).decode()[1:-1]
    return PreparedEvent(head, tail, columns_of(event), digests_of(event))


# --- checkpoints ----------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One link of the signed checkpoint chain."""

    seq: int
    prev_hash: str
    kind: str
    event_seq: int
    event_hash: str
    created_at: str
    every: int
    seconds: int
    key_id: str
    signature: str
    hash: str

    def message(self) -> bytes:
        return checkpoint_message(seq=self.seq, prev_hash=self.prev_hash, kind=self.kind, event_seq=self.event_seq,
                                  event_hash=self.event_hash, created_at=self.created_at, every=self.every,
                                  seconds=self.seconds)

    def content_ok(self) -> bool:
        return self.kind in CheckpointKind.ALL and hashlib.sha256(self.message()).hexdigest() == self.hash

    def signed_by(self, key: keys.VerifyingKey) -> bool:
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except ValueError:
            return False
        return key.verify(signature, self.message())

    def describe(self) -> str:
        return f"checkpoint {self.seq} (event {self.event_seq}, {self.created_at})"

    def to_json(self) -> dict[str, Any]:
        """The published form: a stdout line, the operator's ConfigMap, an anchor file."""
        return {"msg": ANCHOR_MESSAGE, "checkpoint": self.seq, "previous": self.prev_hash, "kind": self.kind,
                "event": self.event_seq, "eventHash": self.event_hash, "time": self.created_at,
                "every": self.every, "seconds": self.seconds, "keyId": self.key_id, "signature": self.signature,
                "hash": self.hash}


def checkpoint_message(*, seq: int, prev_hash: str, kind: str, event_seq: int, event_hash: str, created_at: str,
                       every: int, seconds: int) -> bytes:
    """What the server signs; the checkpoint's hash is the SHA-256 of this text."""
    return (f"promotion-gate audit checkpoint v2\n{seq}\n{prev_hash}\n{kind}\n{event_seq}\n{event_hash}\n"
            f"{created_at}\n{every}\n{seconds}").encode()


def checkpoint_from_json(data: Any) -> Checkpoint | None:
    """A published checkpoint read back (an anchor), or None when ``data`` is not one."""
    if not isinstance(data, Mapping) or data.get("msg") != ANCHOR_MESSAGE:
        return None
    ints = ("checkpoint", "event", "every", "seconds")
    texts = ("previous", "kind", "eventHash", "time", "keyId", "signature", "hash")
    if any(isinstance(data.get(k), bool) or not isinstance(data.get(k), int) for k in ints):
        return None
    if any(not isinstance(data.get(k), str) for k in texts):
        return None
    return Checkpoint(seq=data["checkpoint"], prev_hash=data["previous"], kind=data["kind"], event_seq=data["event"],
                      event_hash=data["eventHash"], created_at=data["time"], every=data["every"],
                      seconds=data["seconds"], key_id=data["keyId"], signature=data["signature"], hash=data["hash"])


@dataclass(frozen=True)
class Sealer:
    """The server's checkpoint key and the schedule it keeps (``audit.checkpointEvery``/``…Seconds``)."""

    key: keys.SigningKey
    every: int
    seconds: int

    def sign(self, *, seq: int, prev_hash: str, kind: str, event_seq: int, event_hash: str, created_at: str,
             every: int | None = None, seconds: int | None = None) -> Checkpoint:
        every = self.every if every is None else every
        seconds = self.seconds if seconds is None else seconds
        message = checkpoint_message(seq=seq, prev_hash=prev_hash, kind=kind, event_seq=event_seq,
                                     event_hash=event_hash, created_at=created_at, every=every, seconds=seconds)
        return Checkpoint(seq=seq, prev_hash=prev_hash, kind=kind, event_seq=event_seq, event_hash=event_hash,
                          created_at=created_at, every=every, seconds=seconds, key_id=self.key.key_id,
                          signature=base64.b64encode(self.key.sign(message)).decode(),
                          hash=hashlib.sha256(message).hexdigest())
