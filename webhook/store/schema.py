"""Tables and migrations. Each migration runs once, in order, inside one transaction."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()
_id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

records = Table(
    "records", metadata,
    Column("seq", _id, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("repository", String(512), nullable=False),
    Column("digest", String(140), nullable=False),
    Column("environment", String(63), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("submitted_by", String(256), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("built_as", String(128), nullable=True),  # the promotion's predicate.builtAs (migration 3)
    Index("records_by_digest_environment", "digest", "environment"),
    Index("records_by_repository_tag", "repository", "built_as"),
)

audit_events = Table(
    "audit_events", metadata,
    Column("seq", _id, primary_key=True, autoincrement=False),
    Column("time", String(40), nullable=False),
    Column("uid", String(128), nullable=False),
    Column("namespace", String(253), nullable=False),
    Column("username", String(512), nullable=False),
    Column("allowed", Boolean, nullable=False),
    Column("reasons", String(512), nullable=False),
    Column("event", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("audit_by_time", "time"),
    Index("audit_by_namespace", "namespace"),
)

audit_images = Table(
    "audit_images", metadata,
    Column("event_seq", _id, nullable=False),
    Column("digest", String(140), nullable=False),
    Index("audit_images_by_digest", "digest"),
)

audit_checkpoints = Table(
    "audit_checkpoints", metadata,
    Column("seq", _id, primary_key=True, autoincrement=True),
    Column("event_seq", _id, nullable=False),
    Column("event_hash", String(64), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", Text, nullable=False),
    Column("pruned_before", Boolean, nullable=False, default=False),
)

# Version 4: checkpoints form their own signed hash chain (``webhook.store.audit_format.Checkpoint``).
# ``seq`` is assigned by the writer, never by a database sequence, so that the chain has no gaps of
# its own (a PostgreSQL sequence skips the values of rolled-back inserts). The table above is kept
# for the unchained checkpoints of logs written before it.
audit_checkpoint_chain = Table(
    "audit_checkpoint_chain", metadata,
    Column("seq", _id, primary_key=True, autoincrement=False),
    Column("prev_hash", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("event_seq", _id, nullable=False),
    Column("event_hash", String(64), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("every", Integer, nullable=False),
    Column("seconds", Integer, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", Text, nullable=False),
    Column("hash", String(64), nullable=False),
    Index("audit_checkpoint_chain_by_kind", "kind", "event_seq"),
)


def _v1(conn: Connection) -> None:
    for table in (records, audit_events, audit_images, audit_checkpoints):
        table.create(conn)


def _v2_append_only(conn: Connection) -> None:
    # Records are immutable: the database itself refuses UPDATE and DELETE, whatever the client.
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.execute(text(
                f"CREATE TRIGGER records_no_{op.lower()} BEFORE {op} ON records "
                "BEGIN SELECT RAISE(ABORT, 'records are append-only'); END"))
    else:
        conn.execute(text(
            "CREATE FUNCTION promotion_gate_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'records are append-only'; END $$"))
        conn.execute(text(
            "CREATE TRIGGER records_append_only BEFORE UPDATE OR DELETE ON records "
            "FOR EACH ROW EXECUTE FUNCTION promotion_gate_append_only()"))


def _v3_built_as(conn: Connection) -> None:
    # "Which digest was built as :abc123?" for admission's mutable-tag fix and for `pin`: the tag a
    # promotion states, as a column with an index by repository. Migration 1 creates its tables from
    # today's metadata, so a new store already has both; an older one gets them here. Rows stored
    # before this keep NULL: no record could state a tag then.
    inspector = sa.inspect(conn)
    if "built_as" not in {c["name"] for c in inspector.get_columns("records")}:
        conn.execute(text("ALTER TABLE records ADD COLUMN built_as VARCHAR(128)"))
    if "records_by_repository_tag" not in {i["name"] for i in inspector.get_indexes("records")}:
        conn.execute(text("CREATE INDEX records_by_repository_tag ON records (repository, built_as)"))


APPEND_ONLY_CHECKPOINTS = "audit checkpoints are append-only"
APPEND_ONLY_EVENTS = "audit events are append-only"
PRUNE_ONLY = "audit events are removed only by 'promotion-gate audit prune', up to its signed prune marker"


def _v4_chained_checkpoints(conn: Connection) -> None:
    # The audit tables become append-only at the database too. Events and their index rows may be
    # deleted only up to a signed prune marker, which 'audit prune' writes in the same transaction.
    # Someone who can drop the triggers can still change the tables: the hash chains and the signed
    # checkpoints are what detect that (docs/security.md).
    audit_checkpoint_chain.create(conn)
    # By raw SQL: an Index object on the table would also be created by _v1 on a fresh database.
    conn.execute(text("CREATE INDEX audit_images_by_event ON audit_images (event_seq, digest)"))
    sqlite = conn.dialect.name == "sqlite"
    if not sqlite:
        conn.execute(text(
            "CREATE FUNCTION promotion_gate_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$"))
        conn.execute(text(
            "CREATE FUNCTION promotion_gate_audit_prune_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NOT EXISTS (SELECT 1 FROM audit_checkpoint_chain WHERE kind = 'prune' "
            "AND event_seq >= (to_jsonb(OLD) ->> TG_ARGV[0])::bigint) THEN RAISE EXCEPTION '%', TG_ARGV[1]; END IF; "
            "RETURN OLD; END $$"))
    refusals = [("audit_checkpoint_chain", "UPDATE", APPEND_ONLY_CHECKPOINTS),
                ("audit_checkpoint_chain", "DELETE", APPEND_ONLY_CHECKPOINTS),
                ("audit_checkpoints", "UPDATE", APPEND_ONLY_CHECKPOINTS),
                ("audit_checkpoints", "DELETE", APPEND_ONLY_CHECKPOINTS),
                ("audit_events", "UPDATE", APPEND_ONLY_EVENTS),
                ("audit_images", "UPDATE", APPEND_ONLY_EVENTS)]
    for table, op, message in refusals:
        name = f"{table}_no_{op.lower()}"
        if sqlite:
            conn.execute(text(f"CREATE TRIGGER {name} BEFORE {op} ON {table} "
                              f"BEGIN SELECT RAISE(ABORT, '{message}'); END"))
        else:
            conn.execute(text(f"CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW "
                              f"EXECUTE FUNCTION promotion_gate_audit_refuse('{message}')"))
    for table, column in (("audit_events", "seq"), ("audit_images", "event_seq")):
        message = PRUNE_ONLY.replace("'", "''")
        if sqlite:
            conn.execute(text(
                f"CREATE TRIGGER {table}_prune_only BEFORE DELETE ON {table} WHEN NOT EXISTS "
                f"(SELECT 1 FROM audit_checkpoint_chain WHERE kind = 'prune' AND event_seq >= OLD.{column}) "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"))
        else:
            conn.execute(text(f"CREATE TRIGGER {table}_prune_only BEFORE DELETE ON {table} FOR EACH ROW "
                              f"EXECUTE FUNCTION promotion_gate_audit_prune_only('{column}', '{message}')"))
    if not sqlite:
        # TRUNCATE skips row triggers; refuse it outright.
        for table in ("audit_events", "audit_images", "audit_checkpoints", "audit_checkpoint_chain"):
            conn.execute(text(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} FOR EACH STATEMENT "
                              f"EXECUTE FUNCTION promotion_gate_audit_refuse('{APPEND_ONLY_EVENTS}')"))


def _v5_one_repository_index(conn: Connection) -> None:
    # records_by_repository (repository) is a prefix of records_by_repository_tag (repository,
    # built_as), which serves every query the first one did. Two indexes starting with the same column
    # cost every insert twice, and left the planner a tie that it broke either way: a lookup by
    # repository and tag must use the index that holds both.
    conn.execute(text("DROP INDEX IF EXISTS records_by_repository"))


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2_append_only, _v3_built_as, _v4_chained_checkpoints,
                                                  _v5_one_repository_index]
