"""Admission reads the store on its own threads; the store's watchdog keeps those reads to their deadline.

A read still running at the deadline is interrupted (SQLite: sqlite3_interrupt; PostgreSQL: the
connection's socket is shut down), the caller learns at once, and the connection is never handed out
again: the reads after it work.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tools.promotion_kit import make_kit
from tools.servers import PostgresServer
from webhook import policy_file
from webhook.metrics import Metrics
from webhook.record_view import CachedRecordView
from webhook.store import SqlStore, StoreUnavailable, open_store

# Runs until interrupted: SQLite counts without end, PostgreSQL sleeps far longer than any deadline.
ENDLESS = {"sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT max(x) FROM n",
           "postgresql": "SELECT pg_sleep(60)"}


def test_a_read_past_its_deadline_is_interrupted_and_the_next_reads_work(store: SqlStore) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable), store.deadline(0.3) as watch, store._reading() as conn:
        conn.execute(sa.text(ENDLESS[store.dialect])).all()
    assert time.monotonic() - started < 3
    assert watch.expired
    for _ in range(20):  # more reads than the pool holds: none is handed the interrupted connection
        with store.deadline(2):
            assert store.records_version() == 0


def test_reads_outside_a_deadline_are_never_interrupted(store: SqlStore) -> None:
    with store.deadline(0.05):
        pass
    time.sleep(0.2)  # the watchdog has had its chance
    query = {"sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000) "
                       "SELECT max(x) FROM n",
             "postgresql": "SELECT pg_sleep(0.3), 300000"}[store.dialect]
    with store._reading() as conn:
        assert conn.execute(sa.text(query)).all()[0][-1] == 300000


def test_a_deadline_already_past_fails_before_reading(store: SqlStore) -> None:
    with store.deadline(0) as watch, pytest.raises(StoreUnavailable, match="timed out"):
        store.records_version()
    assert watch.expired


def test_a_locked_table_costs_admission_its_deadline_not_the_statement_timeout(
        postgres: PostgresServer, tmp_path: Path) -> None:
    """The version check waits on a real lock: interrupted at the deadline, then the pool takes over
    until the store answers again, then reads are inline again (see CachedRecordView._read)."""
    import psycopg

    kit = make_kit(tmp_path / "kit")
    url = postgres.create_database("locked_records")
    store = open_store(url)
    store.migrate()
    policy = policy_file.load(kit.policy_path)
    view = CachedRecordView(store, policy, Metrics())
    subject = [("ghcr.io/acme/app", "sha256:" + "a" * 64)]
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
        for _ in range(2):  # the first on the request's thread, the second through the pool
            started = time.monotonic()
            status = view.lookup(subject, [], "ci").statuses[subject[0]]
            assert time.monotonic() - started < policy.store_timeout_seconds + 1
            assert (status.state.value, status.detail) == ("unavailable", "timed out")
        blocker.rollback()
    for _ in range(3):  # recovered: answered, first through the pool, then on the request's thread
        assert view.lookup(subject, [], "ci").statuses[subject[0]].state.value == "not-promoted"


def test_no_free_connection_costs_admission_its_deadline_not_an_error(store: SqlStore, tmp_path: Path) -> None:
    """Every reader connection busy: the lookup waits on the pool for at most the deadline and
    answers as for an unavailable store; it never fails the request with an unexpected error."""
    kit = make_kit(tmp_path / "kit")
    # A deadline shorter than the pool's own wait for a connection (2 s): the deadline answers.
    policy = replace(policy_file.load(kit.policy_path), store_timeout_seconds=1.0)
    view = CachedRecordView(store, policy, Metrics())
    subject = [("ghcr.io/acme/app", "sha256:" + "a" * 64)]
    held = [store.engine.raw_connection() for _ in range(16)]  # the reader pool's size and overflow
    try:
        started = time.monotonic()
        status = view.lookup(subject, [], "ci").statuses[subject[0]]
        assert time.monotonic() - started < policy.store_timeout_seconds + 1
        assert (status.state.value, status.detail) == ("unavailable", "timed out")
    finally:
        for connection in held:
            connection.close()
    assert view.lookup(subject, [], "ci").statuses[subject[0]].state.value == "not-promoted"


def test_an_unreachable_store_fails_an_audit_group_as_one_outage(tmp_path: Path) -> None:
    """No connection at all is an outage of the whole group (StoreUnavailable), never a data error
    that would send each event to the database again on its own."""
    from webhook.store.audit_format import prepare

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = open_store(f"postgresql://gate@127.0.0.1:{port}/gate")
    attempts = []
    original = store._checkout

    def counted(engine: Any) -> Any:
        attempts.append(engine)
        return original(engine)

    store._checkout = counted  # type: ignore[method-assign]
    events = [prepare({"time": "2026-11-28T12:00:00Z", "uid": str(i), "namespace": "team-a", "user": "u",
                       "allowed": True, "reasons": [], "images": []}) for i in range(3)]
    with pytest.raises(StoreUnavailable):
        store.append_audit(events)
    assert len(attempts) == 1
