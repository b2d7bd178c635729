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
    Index("records_by_repository", "repository"),
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


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2_append_only, _v3_built_as]
