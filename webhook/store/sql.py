"""SQLAlchemy Core implementation of the store, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from webhook.core import records
from webhook.core.promotion import StoredRecord
from webhook.core.records import SignedRecord
from webhook.store import schema
from webhook.store.audit_format import (
    DIGEST_CHARS,
    GENESIS,
    NAMESPACE_CHARS,
    TIME_CHARS,
    USERNAME_CHARS,
    AuditColumns,
    Checkpoint,
    CheckpointKind,
    PreparedEvent,
    Sealer,
    chain_hash,
    column_text,
    columns_of,
    digests_of,
    image_digests,
    parse_time,
    reasons_of,
    rfc3339,
)
from webhook.store.deadlines import Watch, Watchdog, interrupt_postgresql, interrupt_sqlite
from webhook.store.errors import AuditTampered, DuplicateRecord, StoreError, StoreUnavailable

AUDIT_LOCK_KEY = 0x70676175  # 'pgau': serialises appends to the audit hash chain across replicas
RECORD_LOCK_KEY = 0x70677263
PARSED_CACHE_SIZE = 65536
READ_CHUNK_CHARS = 8 * 1024 * 1024  # event text held in memory at once while reading the log
MAX_PAGE_CHARS = 8 * 1024 * 1024  # event text in one answer of the API
MAX_EVENT_READ_CHARS = 1024 * 1024  # larger events are answered without their text by the API
# Servers write events of at most 8 Mi characters (older versions: some of tens of MiB); anything far
# larger was put there by hand, and reading it whole could exhaust the reader's memory.
MAX_LOCAL_EVENT_CHARS = 64 * 1024 * 1024
BUILDS_PER_TAG = 16
EVENT_COLUMNS = ("seq", "time", "uid", "namespace", "username", "allowed", "reasons", "event", "prev_hash", "hash")
CHECKPOINT_COLUMNS = ("seq", "prev_hash", "kind", "event_seq", "event_hash", "created_at", "every", "seconds", "key_id",
                      "signature", "hash")


class _Columns:
    """A DB-API row read by column name, as the Core's rows are."""

    def __init__(self, names: Sequence[str], row: Sequence[Any]) -> None:
        self.__dict__.update(zip(names, row, strict=True))


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
class AuditRow:
    seq: int
    event: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AppendOutcome:
    """Per event, in order: its stored row, or why it alone was not stored; and the checkpoints made."""

    results: list[AuditRow | Exception]
    checkpoints: list[Checkpoint]


@dataclass(frozen=True, kw_only=True)
class StoredEvent:
    """A stored event with its columns as the database holds them (not yet checked)."""

    seq: int
    prev_hash: str
    hash: str
    columns: AuditColumns
    size: int  # characters of its text
    text: str | None  # None: larger than the reader's limit, not read


@dataclass(frozen=True)
class AuditHit:
    """One event a query found: its stored text (checked), or None when it was too large to read."""

    seq: int
    text: str | None
    columns: AuditColumns
    size: int


@dataclass(frozen=True)
class LegacyCheckpoint:
    """An unchained checkpoint of a log written before version 4 of the schema."""

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
        self._watchdog = Watchdog(interrupt_sqlite if self.dialect == "sqlite" else interrupt_postgresql)
        self._insert_events = (f"INSERT INTO audit_events ({', '.join(EVENT_COLUMNS)}) "
                               f"VALUES ({self._mark(len(EVENT_COLUMNS))})")
        self._insert_images = f"INSERT INTO audit_images (event_seq, digest) VALUES ({self._mark(2)})"
        self._insert_checkpoint = (f"INSERT INTO audit_checkpoint_chain ({', '.join(CHECKPOINT_COLUMNS)}) "
                                   f"VALUES ({self._mark(len(CHECKPOINT_COLUMNS))})")
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
            # a ping on every checkout. Admission reads on its own threads under a deadline
            # (:mod:`.deadlines`), which cannot interrupt a connection being made: libpq's shortest
            # connect timeout (2 s) bounds that, and waiting for a free connection is bounded too.
            self.engine = sa.create_engine(self.url, pool_pre_ping=False, pool_size=8, max_overflow=8, pool_timeout=2,
                                           isolation_level="AUTOCOMMIT",
                                           connect_args={**connect_args, "connect_timeout": 2})

    def _sqlite_engine(self, *, immediate: bool) -> Engine:
        # Readers wait at most 2 s for a free pooled connection, as on PostgreSQL (admission has a deadline).
        engine = sa.create_engine(self.url, connect_args={"timeout": 10, "check_same_thread": False},
                                  pool_size=8, max_overflow=8, pool_timeout=30 if immediate else 2)

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

    def deadline(self, seconds: float) -> AbstractContextManager[Watch]:
        """Reads on this thread inside the block are interrupted ``seconds`` from now (:mod:`.deadlines`)."""
        return self._watchdog.deadline(seconds)

    def reader_idle(self) -> bool:
        """Whether a reader connection is open and idle: a read now need not wait to make one."""
        checkedin = getattr(self.engine.pool, "checkedin", None)
        return bool(checkedin()) if checkedin is not None else False

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, self._watchdog.guard(conn.connection.dbapi_connection,
                                                                     conn.invalidate):
                yield conn
        except (TimeoutError, sa.exc.TimeoutError) as exc:  # our deadline, or no free pooled connection
            raise StoreUnavailable("store unavailable: timed out") from exc
        except OperationalError as exc:
            raise StoreUnavailable(f"store unavailable: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"store error: {exc}") from exc

    @staticmethod
    def _checkout(engine: Engine) -> Any:
        """A pooled DB-API connection; failing to get one, however, is an outage of the store.

        ``raw_connection`` hands the pool's and the driver's exceptions through unwrapped.
        """
        try:
            return engine.raw_connection()
        except (TimeoutError, sa.exc.TimeoutError) as exc:
            raise StoreUnavailable("store unavailable: timed out waiting for a connection") from exc
        except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
            raise StoreUnavailable(f"store unavailable: {getattr(exc, 'orig', None) or exc}") from exc

    @contextmanager
    def _driver(self) -> Iterator[Any]:
        """A DB-API cursor on a pooled reader connection, for the admission path's per-request statement.

        Written against the driver on purpose: for a one-row query, SQLAlchemy Core's statement
        machinery costs about 90 µs of CPU per call and the driver about 5 µs; admission asks it on
        every request (docs/benchmarks.md). Everything else goes through the Core.
        """
        dbapi = self.engine.dialect.loaded_dbapi
        connection = self._checkout(self.engine)

        def discard() -> None:
            if connection.is_valid:
                connection.invalidate()  # broken or interrupted: never handed out again

        try:
            with self._watchdog.guard(connection.dbapi_connection, discard):
                cursor = connection.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
        except TimeoutError as exc:
            raise StoreUnavailable("store unavailable: timed out") from exc
        except dbapi.Error as exc:
            discard()
            if isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
                raise StoreUnavailable(f"store unavailable: {exc}") from exc
            raise StoreError(f"store error: {exc}") from exc
        finally:
            connection.close()

    def _mark(self, count: int) -> str:
        """``count`` placeholders in the driver's own parameter style (qmark for sqlite3, format for psycopg)."""
        return ", ".join(["?" if self.dialect == "sqlite" else "%s"] * count)

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
            except self.write_engine.dialect.loaded_dbapi.Error as exc:  # statements sent straight to the driver
                dbapi = self.write_engine.dialect.loaded_dbapi
                if isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
                    raise StoreUnavailable(f"store unavailable: {exc}") from exc
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
        """The highest record sequence number: it changes whenever a record is added.

        Asked once per admission, so it is one statement straight to the driver (see :meth:`_driver`).
        """
        with self._driver() as cursor:
            cursor.execute("SELECT max(seq) FROM records")
            row = cursor.fetchone()
        return int(row[0] or 0) if row else 0

    def record_count(self) -> int:
        with self._reading() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(schema.records)).scalar() or 0)

    def bulk_insert_raw(self, rows: list[dict[str, Any]]) -> None:
        """Benchmark seeding only: insert pre-built rows without the rule check."""
        with self._writing(RECORD_LOCK_KEY) as conn:
            conn.execute(schema.records.insert(), rows)

    # --- audit chain --------------------------------------------------------------------------
    #
    # Events and checkpoints are appended under one lock (in-process, and the PostgreSQL advisory
    # lock across replicas): the chain never forks. A checkpoint that falls due is signed and
    # inserted in the same transaction as the events that make it due, so no committed state lacks
    # a checkpoint that was due (``verify`` relies on that).

    @staticmethod
    @contextmanager
    def _cursor(conn: Connection) -> Iterator[Any]:
        """A DB-API cursor in the transaction of a Core connection."""
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            yield cursor
        finally:
            cursor.close()

    @staticmethod
    def _chain_position(cursor: Any) -> tuple[int, str]:
        """The newest event's (seq, hash); after a prune of every event, the newest checkpoint's."""
        for query in ("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                      "SELECT event_seq, event_hash FROM audit_checkpoint_chain ORDER BY event_seq DESC LIMIT 1",
                      "SELECT event_seq, event_hash FROM audit_checkpoints ORDER BY event_seq DESC LIMIT 1"):
            cursor.execute(query)
            row = cursor.fetchone()
            if row is not None:
                return int(row[0]), str(row[1])
        return 0, GENESIS

    @staticmethod
    def _checkpoint(row: Any) -> Checkpoint:
        return Checkpoint(seq=int(row.seq), prev_hash=row.prev_hash, kind=row.kind, event_seq=int(row.event_seq),
                          event_hash=row.event_hash, created_at=row.created_at, every=int(row.every),
                          seconds=int(row.seconds), key_id=row.key_id, signature=row.signature, hash=row.hash)

    def _checkpoint_heads(self, cursor: Any) -> tuple[Checkpoint | None, Checkpoint | None]:
        """The newest checkpoint (the chain's head) and the newest seal (whose schedule is in force)."""
        select = f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM audit_checkpoint_chain"
        cursor.execute(f"{select} ORDER BY seq DESC LIMIT 1")
        row = cursor.fetchone()
        if row is None:
            return None, None
        head = self._checkpoint(_Columns(CHECKPOINT_COLUMNS, row))
        if head.kind == CheckpointKind.SEAL:
            return head, head
        cursor.execute(f"{select} WHERE kind = {self._mark(1)} ORDER BY seq DESC LIMIT 1", (str(CheckpointKind.SEAL),))
        row = cursor.fetchone()
        return head, self._checkpoint(_Columns(CHECKPOINT_COLUMNS, row)) if row is not None else None

    @staticmethod
    def _time_due(sealer: Sealer, last_seal: Checkpoint, now: datetime) -> bool:
        made = parse_time(last_seal.created_at)
        return made is None or (now - made).total_seconds() >= min(last_seal.seconds, sealer.seconds)

    def append_audit(self, entries: Sequence[PreparedEvent], sealer: Sealer | None = None) -> AppendOutcome:
        """Append events to the chain in one transaction (one fsync for the whole group).

        With a ``sealer``, the checkpoints that fall due are signed and stored in the same transaction.
        When the group fails for any reason but an unavailable store, each event is tried on its own,
        so that one event the database refuses fails alone instead of taking the group with it.
        """
        if not entries:
            return AppendOutcome([], [])
        try:
            rows, checkpoints = self._append(entries, sealer)
            return AppendOutcome(list(rows), checkpoints)
        except StoreUnavailable:
            raise
        except Exception as exc:
            if len(entries) == 1:
                return AppendOutcome([exc], [])
        results: list[AuditRow | Exception] = []
        sealed: list[Checkpoint] = []
        for entry in entries:
            try:
                (row,), checkpoints = self._append([entry], sealer)
            except StoreUnavailable:
                raise
            except Exception as exc:
                results.append(exc)
                continue
            results.append(row)
            sealed.extend(checkpoints)
        return AppendOutcome(results, sealed)

    @staticmethod
    def _sign_next(sealer: Sealer, head: Checkpoint | None, kind: str, event_seq: int, event_hash: str,
                   now: datetime) -> Checkpoint:
        return sealer.sign(seq=head.seq + 1 if head else 1, prev_hash=head.hash if head else GENESIS, kind=kind,
                           event_seq=event_seq, event_hash=event_hash, created_at=rfc3339(now))

    @contextmanager
    def _appending(self) -> Iterator[Any]:
        """The audit chain's append transaction, on a DB-API connection of the write pool.

        Written against the driver on purpose: at the group sizes admission produces (one to a few
        events per commit), SQLAlchemy's transaction and statement machinery cost about 200 µs of CPU
        per commit, as much as SQLite's own work (docs/benchmarks.md). Same lock, same guarantees as
        :meth:`_writing`: serialised in process and, on PostgreSQL, across replicas by the advisory lock.
        """
        dbapi = self.write_engine.dialect.loaded_dbapi
        with self._write_lock:
            connection = self._checkout(self.write_engine)
            try:
                cursor = connection.cursor()
                try:
                    if self.dialect == "sqlite":
                        cursor.execute("BEGIN IMMEDIATE")
                    else:  # psycopg opens the transaction with the first statement
                        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK_KEY,))
                    yield cursor
                    connection.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        connection.rollback()
                    raise
                finally:
                    cursor.close()
            except dbapi.Error as exc:
                if isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
                    if connection.is_valid and self.dialect == "postgresql":
                        connection.invalidate()  # the server went away: never handed out again
                    raise StoreUnavailable(f"store unavailable: {exc}") from exc
                raise StoreError(f"store error: {exc}") from exc  # a constraint refused it: an error like any other
            finally:
                connection.close()

    def _append(self, entries: Sequence[PreparedEvent],
                     sealer: Sealer | None) -> tuple[list[AuditRow], list[Checkpoint]]:
        rows: list[AuditRow] = []
        checkpoints: list[Checkpoint] = []
        with self._appending() as cursor:
            seq, prev = self._chain_position(cursor)
            head_cp, last_seal = self._checkpoint_heads(cursor) if sealer is not None else (None, None)
            now = datetime.now(UTC)
            events: list[tuple[Any, ...]] = []
            images: list[tuple[int, str]] = []

            def seal(event_seq: int, event_hash: str) -> Checkpoint:
                nonlocal head_cp, last_seal
                assert sealer is not None
                checkpoint = self._sign_next(sealer, head_cp, CheckpointKind.SEAL, event_seq, event_hash, now)
                checkpoints.append(checkpoint)
                head_cp = last_seal = checkpoint
                return checkpoint

            for entry in entries:
                seq += 1
                text = entry.text(seq)
                digest = chain_hash(seq, prev, text)
                columns = entry.columns
                events.append((seq, columns.time, columns.uid, columns.namespace, columns.username, columns.allowed,
                               columns.reasons, text, prev, digest))
                images.extend((seq, d) for d in entry.digests)
                rows.append(AuditRow(seq, text, prev, digest))
                prev = digest
                if sealer is not None and (last_seal is None
                                           or seq - last_seal.event_seq >= min(last_seal.every, sealer.every)):
                    seal(seq, digest)
            if sealer is not None and last_seal is not None and last_seal.event_seq < seq \
                    and self._time_due(sealer, last_seal, now):
                seal(seq, prev)
            cursor.executemany(self._insert_events, events)
            if images:
                cursor.executemany(self._insert_images, images)
            if checkpoints:
                cursor.executemany(self._insert_checkpoint, [self._checkpoint_values(c) for c in checkpoints])
        return rows, checkpoints

    def _checkpoint_values(self, checkpoint: Checkpoint) -> tuple[Any, ...]:
        row = self._checkpoint_row(checkpoint)
        return tuple(row[column] for column in CHECKPOINT_COLUMNS)

    @staticmethod
    def _checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
        return {"seq": checkpoint.seq, "prev_hash": checkpoint.prev_hash, "kind": checkpoint.kind,
                "event_seq": checkpoint.event_seq, "event_hash": checkpoint.event_hash,
                "created_at": checkpoint.created_at, "every": checkpoint.every, "seconds": checkpoint.seconds,
                "key_id": checkpoint.key_id, "signature": checkpoint.signature, "hash": checkpoint.hash}

    def seal(self, sealer: Sealer, *, force: bool = False,
             keep_schedule: bool = False) -> tuple[Checkpoint | None, bool]:
        """Sign a checkpoint at the head when one is due (or now, with ``force``).

        ``keep_schedule``: promise the schedule of the newest seal, not the sealer's (a manual
        checkpoint must not loosen what the server promised). Returns the new checkpoint, if any, and
        whether events remain that no checkpoint covers.
        """
        with self._writing(AUDIT_LOCK_KEY) as conn, self._cursor(conn) as cursor:
            seq, prev = self._chain_position(cursor)
            head_cp, last_seal = self._checkpoint_heads(cursor)
            if seq == 0 or (last_seal is not None and last_seal.event_seq >= seq):
                return None, False
            now = datetime.now(UTC)
            if not force and last_seal is not None and not self._time_due(sealer, last_seal, now):
                return None, True
            if keep_schedule and last_seal is not None:
                sealer = Sealer(sealer.key, last_seal.every, last_seal.seconds)
            checkpoint = self._sign_next(sealer, head_cp, CheckpointKind.SEAL, seq, prev, now)
            conn.execute(schema.audit_checkpoint_chain.insert().values(**self._checkpoint_row(checkpoint)))
        return checkpoint, False

    def prune_audit(self, sealer: Sealer, up_to_seq: int, expected_hash: str) -> tuple[Checkpoint, int]:
        """Sign a prune marker at event ``up_to_seq``, then delete the events up to it: one transaction."""
        with self._writing(AUDIT_LOCK_KEY) as conn:
            t = schema.audit_events
            row = conn.execute(sa.select(t.c.hash).where(t.c.seq == up_to_seq)).first()
            if row is None or row.hash != expected_hash:
                raise StoreError(f"event {up_to_seq} changed while pruning; run 'promotion-gate audit verify'")
            with self._cursor(conn) as cursor:
                head_cp, _ = self._checkpoint_heads(cursor)
            marker = self._sign_next(sealer, head_cp, CheckpointKind.PRUNE, up_to_seq, expected_hash,
                                     datetime.now(UTC))
            conn.execute(schema.audit_checkpoint_chain.insert().values(**self._checkpoint_row(marker)))
            conn.execute(schema.audit_images.delete().where(schema.audit_images.c.event_seq <= up_to_seq))
            removed = conn.execute(t.delete().where(t.c.seq <= up_to_seq)).rowcount
        return marker, int(removed or 0)

    def audit_head(self) -> tuple[int, str] | None:
        with self._reading() as conn:
            row = conn.execute(sa.select(schema.audit_events.c.seq, schema.audit_events.c.hash)
                               .order_by(schema.audit_events.c.seq.desc()).limit(1)).first()
        return (int(row.seq), str(row.hash)) if row else None

    def newest_seq_before(self, moment: str) -> int | None:
        """The newest event (in chain order) whose time is before ``moment``."""
        t = schema.audit_events
        with self._reading() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.seq)).where(t.c.time < moment)).scalar()
        return int(value) if value is not None else None

    # --- reading the log in bounded memory ----------------------------------------------------

    def checkpoints(self, *, after: int = 0, page: int = 1000) -> Iterator[Checkpoint]:
        """The checkpoint chain in order, read page by page."""
        c = schema.audit_checkpoint_chain
        while True:
            with self._reading() as conn:
                rows = conn.execute(sa.select(c).where(c.c.seq > after).order_by(c.c.seq).limit(page)).all()
            for row in rows:
                yield self._checkpoint(row)
            if len(rows) < page:
                return
            after = int(rows[-1].seq)

    def checkpoint_head(self) -> Checkpoint | None:
        with self._reading() as conn, self._cursor(conn) as cursor:
            head, _ = self._checkpoint_heads(cursor)
        return head

    def checkpoint_at(self, seq: int) -> Checkpoint | None:
        c = schema.audit_checkpoint_chain
        with self._reading() as conn:
            row = conn.execute(sa.select(c).where(c.c.seq == seq)).first()
        return self._checkpoint(row) if row is not None else None

    def legacy_checkpoints(self, *, page: int = 1000) -> Iterator[LegacyCheckpoint]:
        """The unchained checkpoints of logs written before version 4 of the schema."""
        c = schema.audit_checkpoints
        after = 0
        while True:
            with self._reading() as conn:
                rows = conn.execute(sa.select(c).where(c.c.seq > after).order_by(c.c.seq).limit(page)).all()
            for r in rows:
                yield LegacyCheckpoint(int(r.seq), int(r.event_seq), r.event_hash, r.created_at, r.key_id,
                                       r.signature, bool(r.pruned_before))
            if len(rows) < page:
                return
            after = int(rows[-1].seq)

    def event_hash(self, seq: int) -> str | None:
        t = schema.audit_events
        with self._reading() as conn:
            row = conn.execute(sa.select(t.c.hash).where(t.c.seq == seq)).first()
        return str(row.hash) if row is not None else None

    def image_rows(self, *, page: int = 5000) -> Iterator[tuple[int, str]]:
        """The images index, in (event, digest) order."""
        t = schema.audit_images
        after: tuple[int, str] = (-1, "")
        while True:
            with self._reading() as conn:
                rows = conn.execute(sa.select(t.c.event_seq, t.c.digest)
                                    .where(sa.or_(t.c.event_seq > after[0],
                                                  sa.and_(t.c.event_seq == after[0], t.c.digest > after[1])))
                                    .order_by(t.c.event_seq, t.c.digest).limit(page)).all()
            for row in rows:
                yield int(row.event_seq), str(row.digest)
            if len(rows) < page:
                return
            after = (int(rows[-1].event_seq), str(rows[-1].digest))

    def events(self, *, after: int = 0, where: Sequence[Any] = (), max_event_chars: int | None = None,
               chunk_chars: int = READ_CHUNK_CHARS, page: int = 256) -> Iterator[StoredEvent]:
        """Stored events in chain order, with their columns as stored.

        Memory stays bounded whatever the events' sizes: a page of metadata first, then the texts in
        chunks of at most ``chunk_chars`` characters (one event alone when it is larger). Events
        larger than ``max_event_chars`` come without their text.
        """
        t = schema.audit_events
        size = sa.func.length(t.c.event).label("size")
        meta_columns = (t.c.seq, t.c.time, t.c.uid, t.c.namespace, t.c.username, t.c.allowed, t.c.reasons,
                        t.c.prev_hash, t.c.hash, size)
        while True:
            with self._reading() as conn:
                meta = conn.execute(sa.select(*meta_columns).where(t.c.seq > after, *where).order_by(t.c.seq)
                                    .limit(page)).all()
            index = 0
            while index < len(meta):
                chunk: list[Any] = [meta[index]]
                total = int(meta[index].size or 0)
                index += 1
                while index < len(meta) and total + int(meta[index].size or 0) <= chunk_chars:
                    total += int(meta[index].size or 0)
                    chunk.append(meta[index])
                    index += 1
                wanted = [int(m.seq) for m in chunk if max_event_chars is None or int(m.size or 0) <= max_event_chars]
                texts: dict[int, str] = {}
                if wanted:
                    with self._reading() as conn:
                        texts = {int(r.seq): r.event for r in conn.execute(
                            sa.select(t.c.seq, t.c.event).where(t.c.seq.in_(wanted)))}
                for m in chunk:
                    yield StoredEvent(seq=int(m.seq), prev_hash=m.prev_hash, hash=m.hash, size=int(m.size or 0),
                                      columns=AuditColumns(time=m.time, uid=m.uid, namespace=m.namespace,
                                                           username=m.username, allowed=bool(m.allowed),
                                                           reasons=m.reasons),
                                      text=texts.get(int(m.seq)))
                texts.clear()
            if len(meta) < page:
                return
            after = int(meta[-1].seq)

    def query_audit(self, query: AuditQuery, *, after: int = 0,
                    max_event_chars: int | None = None) -> Iterator[AuditHit]:
        """Events that match ``query``, oldest first, each re-checked against its hashed content.

        The filter runs on the indexed columns; every event found is then checked: its text against
        its hash, its columns and index rows against its text, and the filter against its text. An
        edited column or index row raises :class:`AuditTampered` instead of silently changing the
        answer; an event larger than ``max_event_chars`` comes without its text (and unchecked).
        """
        for stored in self.events(after=after, where=query.where(), max_event_chars=max_event_chars):
            if stored.text is None:
                yield AuditHit(stored.seq, None, stored.columns, stored.size)
                continue
            event = recheck(stored)
            if query.digest and column_text(query.digest, DIGEST_CHARS) not in digests_of(event):
                raise AuditTampered(f"event {stored.seq}: the images index names {query.digest}, which the event "
                                    "does not")
            if query.matches(event):
                yield AuditHit(stored.seq, stored.text, stored.columns, stored.size)

    def audit_page(self, query: AuditQuery, *, after: int = 0, limit: int = 1000, max_chars: int = MAX_PAGE_CHARS,
                   max_event_chars: int | None = MAX_EVENT_READ_CHARS) -> AuditPage:
        """At most ``limit`` events and ``max_chars`` characters of event text, from after event ``after``.

        ``next`` is set when more events may follow: ask again with ``after=next``.
        """
        hits: list[AuditHit] = []
        used = 0
        for hit in self.query_audit(query, after=after, max_event_chars=max_event_chars):
            size = len(hit.text) if hit.text is not None else 0
            if len(hits) >= limit or (hits and used + size > max_chars):
                return AuditPage(hits, hits[-1].seq)
            hits.append(hit)
            used += size
        return AuditPage(hits, None)


@dataclass(frozen=True)
class AuditPage:
    events: list[AuditHit]
    next: int | None  # more may follow after this event


def recheck(stored: StoredEvent) -> dict[str, Any]:
    """The event of a stored row, after checking the row against its own hash; raises AuditTampered."""
    assert stored.text is not None
    problem = f"event {stored.seq} was altered: its content does not match its hash"
    if chain_hash(stored.seq, stored.prev_hash, stored.text) != stored.hash:
        raise AuditTampered(problem)
    try:
        event = orjson.loads(stored.text)
    except orjson.JSONDecodeError as exc:
        raise AuditTampered(problem) from exc
    if not isinstance(event, dict) or event.get("seq") != stored.seq:
        raise AuditTampered(problem)
    column = columns_of(event).differing(stored.columns)
    if column is not None:
        raise AuditTampered(f"event {stored.seq}: its {column} column does not match its hashed content")
    return event


@dataclass(frozen=True)
class AuditQuery:
    """What ``audit`` and ``GET /api/v1/audit`` filter on; every field optional."""

    since: str | None = None
    until: str | None = None
    namespace: str | None = None
    user: str | None = None
    digest: str | None = None
    reason: str | None = None
    allowed: bool | None = None

    def where(self) -> list[Any]:
        t = schema.audit_events
        clauses: list[Any] = []
        if self.since:
            clauses.append(t.c.time >= column_text(self.since, TIME_CHARS))
        if self.until:
            clauses.append(t.c.time < column_text(self.until, TIME_CHARS))
        if self.namespace:
            clauses.append(t.c.namespace == column_text(self.namespace, NAMESPACE_CHARS))
        if self.user:
            clauses.append(t.c.username == column_text(self.user, USERNAME_CHARS))
        if self.allowed is not None:
            clauses.append(t.c.allowed == self.allowed)
        if self.reason:
            reason = self.reason
            clauses.append(sa.or_(t.c.reasons == reason, t.c.reasons.like(f"{reason},%"),
                                  t.c.reasons.like(f"%,{reason}"), t.c.reasons.like(f"%,{reason},%")))
        if self.digest:
            clauses.append(t.c.seq.in_(sa.select(schema.audit_images.c.event_seq)
                                       .where(schema.audit_images.c.digest == column_text(self.digest, DIGEST_CHARS))))
        return clauses

    def matches(self, event: Mapping[str, Any]) -> bool:
        """The filter applied to the event itself (its complete values, not the bounded columns)."""
        time = event.get("time")
        checks = (
            not self.since or (isinstance(time, str) and time >= self.since),
            not self.until or (isinstance(time, str) and time < self.until),
            not self.namespace or event.get("namespace") == self.namespace,
            not self.user or event.get("user") == self.user,
            self.allowed is None or event.get("allowed") is self.allowed,
            not self.reason or self.reason in reasons_of(event),
            not self.digest or self.digest in image_digests(event),
        )
        return all(checks)


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
