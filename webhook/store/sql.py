"""SQLAlchemy Core implementation of the store, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from webhook.core import records
from webhook.core.promotion import StoredRecord
from webhook.core.records import SignedRecord
from webhook.store import schema
from webhook.store.errors import DuplicateRecord, StoreError, StoreUnavailable

AUDIT_LOCK_KEY = 0x70676175  # 'pgau': serialises appends to the audit hash chain across replicas
RECORD_LOCK_KEY = 0x70677263
PARSED_CACHE_SIZE = 65536
BUILDS_PER_TAG = 16


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid store URL>"


def _normalise(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid store URL {url!r}: use sqlite:///path/to/file.db or postgresql://…") from exc
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StoreError("the SQLite store needs a file: sqlite:///var/promotion-gate.db")
        return parsed
    raise StoreError(f"unsupported store {parsed.drivername!r}: use sqlite:///… or postgresql://…")


# Stored envelopes are immutable, and the same ones are read again and again on the admission path.
_parse_envelope = functools.lru_cache(maxsize=PARSED_CACHE_SIZE)(records.open_envelope)

# Called inside the write transaction with every record already stored for the digest; raises to refuse.
AcceptanceCheck = Callable[[Sequence[StoredRecord]], None]


@dataclass(frozen=True)
class AuditEntry:
    """One event to append; ``build(seq, prev_hash)`` returns (event_json, hash) once its place is known."""

    build: Callable[[int, str], tuple[str, str]]
    time: str
    uid: str
    namespace: str
    username: str
    allowed: bool
    reasons: str
    digests: Sequence[str]


@dataclass(frozen=True)
class AuditRow:
    seq: int
    event: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    event_seq: int
    event_hash: str
    created_at: str
    key_id: str
    signature: str
    pruned_before: bool


class SqlStore:
    def __init__(self, url: str) -> None:
        self.url = _normalise(url)
        self.dialect = "sqlite" if self.url.drivername == "sqlite" else "postgresql"
        self._write_lock = threading.Lock()  # in-process writers queue here instead of on the DB lock
        if self.dialect == "sqlite":
            Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            self.engine = self._sqlite_engine(immediate=False)
            self.write_engine = self._sqlite_engine(immediate=True)
        else:
            connect_args = {"connect_timeout": 5, "options": "-c statement_timeout=10000"}
            self.write_engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=8,
                                                 connect_args=connect_args)
            # Readers run single statements: autocommit saves the BEGIN/ROLLBACK round trips, and a
            # connection broken by a server restart fails one lookup (fail closed) instead of costing
            # a ping on every checkout.
            self.engine = sa.create_engine(self.url, pool_pre_ping=False, pool_size=8, max_overflow=8,
                                           isolation_level="AUTOCOMMIT", connect_args=connect_args)

    def _sqlite_engine(self, *, immediate: bool) -> Engine:
        engine = sa.create_engine(self.url, connect_args={"timeout": 10, "check_same_thread": False},
                                  pool_size=8, max_overflow=8)

        @sa_event.listens_for(engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            # WAL + synchronous=FULL: a committed (acknowledged) write survives a crash or power loss.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        if immediate:
            # Writers take the write lock up front instead of failing to upgrade a read lock later.
            # Readers run in autocommit: each of their queries is one statement, atomic in WAL mode.
            @sa_event.listens_for(engine, "begin")
            def on_begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def close(self) -> None:
        self.write_engine.dispose()
        self.engine.dispose()

    # --- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailable(f"store unavailable: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"store error: {exc}") from exc

    @contextmanager
    def _writing(self, lock_key: int) -> Iterator[Connection]:
        with self._write_lock:
            try:
                with self.write_engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
                    yield conn
            except (IntegrityError, DuplicateRecord):
                raise
            except OperationalError as exc:
                raise StoreUnavailable(f"store unavailable: {exc.orig or exc}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"store error: {exc}") from exc

    def migrate(self) -> int:
        """Bring the schema up to date; safe to run from several replicas at once."""
        try:
            with self.write_engine.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": RECORD_LOCK_KEY})
                schema.schema_version.create(conn, checkfirst=True)
                current = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar() or 0
                for version, migration in enumerate(schema.MIGRATIONS, start=1):
                    if version > current:
                        migration(conn)
                        conn.execute(schema.schema_version.insert().values(version=version))
                return len(schema.MIGRATIONS)
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot open store {redact(str(self.url))}: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {exc}") from exc

    # --- records ------------------------------------------------------------------------------

    @staticmethod
    def _stored(row: Any) -> StoredRecord:
        signed = _parse_envelope(row.envelope)
        return StoredRecord(seq=row.seq, id=row.id, record=signed.record, envelope=signed.envelope,
                            submitted_by=row.submitted_by, stored_at=row.recorded_at)

    def add_record(self, signed: SignedRecord, submitted_by: str, check: AcceptanceCheck) -> StoredRecord:
        """Run ``check`` against the digest's stored records and append, in one transaction: all or nothing."""
        envelope, record = signed.envelope, signed.record
        record_id = signed.id
        envelope_json = envelope.dumps()
        with self._writing(RECORD_LOCK_KEY) as conn:
            if conn.execute(sa.select(schema.records.c.seq).where(schema.records.c.id == record_id)).first():
                raise DuplicateRecord(record_id)
            existing = [self._stored(r) for r in conn.execute(
                sa.select(schema.records).where(schema.records.c.digest == record.digest)
                .order_by(schema.records.c.seq))]
            check(existing)
            recorded_at = records.timestamp(datetime.now(UTC))
            try:
                result = conn.execute(schema.records.insert().values(
                    id=record_id, kind=str(record.kind), repository=record.repository, digest=record.digest,
                    environment=record.environment, recorded_at=recorded_at, submitted_by=submitted_by,
                    envelope=envelope_json, built_as=record.built_as or None))
            except IntegrityError as exc:
                raise DuplicateRecord(record_id) from exc
            seq = result.inserted_primary_key[0] if result.inserted_primary_key else 0
        return StoredRecord(seq=int(seq), id=record_id, record=record, envelope=envelope, submitted_by=submitted_by,
                            stored_at=recorded_at)

    def records_for_digests(self, digests: Sequence[str]) -> dict[str, list[StoredRecord]]:
        """All records of several digests in one query (the admission path's single round trip)."""
        found: dict[str, list[StoredRecord]] = {d: [] for d in digests}
        with self._reading() as conn:
            rows = conn.execute(sa.select(schema.records).where(schema.records.c.digest.in_(list(set(digests))))
                                .order_by(schema.records.c.seq)).all()
        for row in rows:
            found[row.digest].append(self._stored(row))
        return found

    def records_for_subjects(self, digests: Sequence[str], tags: Sequence[tuple[str, str]],
                             builds_per_tag: int = BUILDS_PER_TAG) -> dict[str, list[StoredRecord]]:
        """Every record of ``digests`` and of the digests last recorded as built as each (repository, tag).

        One statement, so admission's single round trip answers both "is this digest promoted?" and
        "which digest was built as this tag?". Per tag, only the ``builds_per_tag`` newest builds
        count: a tag such as ``latest`` recorded on every build must not load the whole history.
        """
        t = schema.records
        conditions = [t.c.digest.in_(list(set(digests)))] if digests else []
        for repository, tag in dict.fromkeys(tags):
            builds = (sa.select(t.c.digest).where(t.c.repository == repository, t.c.built_as == tag)
                      .order_by(t.c.seq.desc()).limit(builds_per_tag))
            conditions.append(t.c.digest.in_(builds))
        found: dict[str, list[StoredRecord]] = {d: [] for d in digests}
        if not conditions:
            return found
        with self._reading() as conn:
            rows = conn.execute(sa.select(t).where(sa.or_(*conditions)).order_by(t.c.seq)).all()
        for row in rows:
            found.setdefault(row.digest, []).append(self._stored(row))
        return found

    def records_for_digest(self, digest: str) -> list[StoredRecord]:
        return self.records_for_digests([digest])[digest]

    def find_records(self, *, repository: str | None = None, digest: str | None = None,
                     environment: str | None = None, limit: int = 100, after: int = 0) -> list[StoredRecord]:
        query = sa.select(schema.records).where(schema.records.c.seq > after)
        if repository:
            query = query.where(schema.records.c.repository == repository)
        if digest:
            query = query.where(schema.records.c.digest == digest)
        if environment:
            query = query.where(schema.records.c.environment == environment)
        with self._reading() as conn:
            rows = conn.execute(query.order_by(schema.records.c.seq).limit(limit)).all()
        return [self._stored(r) for r in rows]

    def records_version(self) -> int:
        """The highest record sequence number: it changes whenever a record is added."""
        with self._reading() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema.records.c.seq))).scalar() or 0)

    def record_count(self) -> int:
        with self._reading() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(schema.records)).scalar() or 0)

    def bulk_insert_raw(self, rows: list[dict[str, Any]]) -> None:
        """Benchmark seeding only: insert pre-built rows without the rule check."""
        with self._writing(RECORD_LOCK_KEY) as conn:
            conn.execute(schema.records.insert(), rows)

    # --- audit chain --------------------------------------------------------------------------

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRow]:
        """Append events to the chain in one transaction (one fsync for the whole group)."""
        if not entries:
            return []
        rows: list[AuditRow] = []
        with self._writing(AUDIT_LOCK_KEY) as conn:
            head = conn.execute(sa.select(schema.audit_events.c.seq, schema.audit_events.c.hash)
                                .order_by(schema.audit_events.c.seq.desc()).limit(1)).first()
            if head is None:
                checkpoint = conn.execute(sa.select(schema.audit_checkpoints)
                                          .order_by(schema.audit_checkpoints.c.seq.desc()).limit(1)).first()
                seq, prev = (checkpoint.event_seq + 1, checkpoint.event_hash) if checkpoint else (1, "0" * 64)
            else:
                seq, prev = head.seq + 1, head.hash
            events: list[dict[str, Any]] = []
            images: list[dict[str, Any]] = []
            for entry in entries:
                event_json, digest = entry.build(seq, prev)
                events.append({"seq": seq, "time": entry.time, "uid": entry.uid, "namespace": entry.namespace,
                               "username": entry.username, "allowed": entry.allowed, "reasons": entry.reasons,
                               "event": event_json, "prev_hash": prev, "hash": digest})
                images.extend({"event_seq": seq, "digest": d} for d in sorted(set(entry.digests)))
                rows.append(AuditRow(seq, event_json, prev, digest))
                seq, prev = seq + 1, digest
            conn.execute(schema.audit_events.insert(), events)
            if images:
                conn.execute(schema.audit_images.insert(), images)
        return rows

    def audit_head(self) -> tuple[int, str] | None:
        with self._reading() as conn:
            row = conn.execute(sa.select(schema.audit_events.c.seq, schema.audit_events.c.hash)
                               .order_by(schema.audit_events.c.seq.desc()).limit(1)).first()
        return (int(row.seq), str(row.hash)) if row else None

    def audit_rows(self, *, after: int = 0, limit: int = 1000) -> list[AuditRow]:
        with self._reading() as conn:
            rows = conn.execute(sa.select(schema.audit_events.c.seq, schema.audit_events.c.event,
                                          schema.audit_events.c.prev_hash, schema.audit_events.c.hash)
                                .where(schema.audit_events.c.seq > after)
                                .order_by(schema.audit_events.c.seq).limit(limit)).all()
        return [AuditRow(r.seq, r.event, r.prev_hash, r.hash) for r in rows]

    def query_audit(self, *, since: str | None = None, until: str | None = None, namespace: str | None = None,
                    user: str | None = None, digest: str | None = None, reason: str | None = None,
                    allowed: bool | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        t = schema.audit_events
        query = sa.select(t.c.event)
        if since:
            query = query.where(t.c.time >= since)
        if until:
            query = query.where(t.c.time < until)
        if namespace:
            query = query.where(t.c.namespace == namespace)
        if user:
            query = query.where(t.c.username == user)
        if allowed is not None:
            query = query.where(t.c.allowed == allowed)
        if reason:
            query = query.where(sa.or_(t.c.reasons == reason, t.c.reasons.like(f"{reason},%"),
                                       t.c.reasons.like(f"%,{reason}"), t.c.reasons.like(f"%,{reason},%")))
        if digest:
            query = query.where(t.c.seq.in_(sa.select(schema.audit_images.c.event_seq)
                                            .where(schema.audit_images.c.digest == digest)))
        with self._reading() as conn:
            rows = conn.execute(query.order_by(t.c.seq).limit(limit)).all()
        return [json.loads(r.event) for r in rows]

    def add_checkpoint(self, event_seq: int, event_hash: str, created_at: str, key_id: str, signature: str,
                       *, pruned_before: bool = False) -> None:
        with self._writing(AUDIT_LOCK_KEY) as conn:
            conn.execute(schema.audit_checkpoints.insert().values(
                event_seq=event_seq, event_hash=event_hash, created_at=created_at, key_id=key_id,
                signature=signature, pruned_before=pruned_before))

    def checkpoints(self) -> list[Checkpoint]:
        with self._reading() as conn:
            rows = conn.execute(sa.select(schema.audit_checkpoints).order_by(schema.audit_checkpoints.c.seq)).all()
        return [Checkpoint(r.seq, r.event_seq, r.event_hash, r.created_at, r.key_id, r.signature,
                           bool(r.pruned_before)) for r in rows]

    def prune_audit(self, up_to_seq: int) -> int:
        """Delete events up to a checkpointed event (inclusive); the checkpoint anchors what remains."""
        with self._writing(AUDIT_LOCK_KEY) as conn:
            conn.execute(schema.audit_images.delete().where(schema.audit_images.c.event_seq <= up_to_seq))
            result = conn.execute(schema.audit_events.delete().where(schema.audit_events.c.seq <= up_to_seq))
            conn.execute(schema.audit_checkpoints.update()
                         .where(schema.audit_checkpoints.c.event_seq == up_to_seq).values(pruned_before=True))
            return int(result.rowcount or 0)


def open_store(url: str, *, migrate: bool = False) -> SqlStore:
    """Open the store at ``url``; with ``migrate``, bring its schema up to date first (idempotent)."""
    store = SqlStore(url)
    if migrate:
        try:
            store.migrate()
        except StoreError:
            store.close()
            raise
    return store
