"""The tamper-evident decision log on both backends: chain, checkpoints, verify, prune, failure policy."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.audit_tamper import attacker_on
from tools.promotion_kit import Kit, cli, make_kit, policy_document
from tools.reviews import review, workload
from tools.servers import RunningServer
from webhook import policy_file
from webhook.decision_log import AuditEventTooLarge, ChainedDecisionLog
from webhook.metrics import Metrics
from webhook.store import open_store, schema
from webhook.store.audit_format import (
    GENESIS,
    Sealer,
    canonical,
    chain_hash,
    columns_of,
    legacy_checkpoint_message,
    prepare,
)
from webhook.store.sql import AUDIT_LOCK_KEY, AuditQuery


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


def server_with_events(server_factory, kit: Kit, store_url: str, count: int = 12) -> RunningServer:  # type: ignore[no-untyped-def]
    gate: RunningServer = server_factory(policy=kit.policy_path.read_text(), store=store_url,
                                         extra=["--server-key", str(kit.key("release"))])
    for index in range(count):
        namespace = "payments-ci" if index % 2 else "team-x"
        image = f"ghcr.io/acme/app{index}:1" if index % 3 else "ghcr.io/acme/app@sha256:" + f"{index:064x}"
        body = review(workload("Pod", [image], name=f"p{index}", namespace=namespace), user=f"user{index % 3}",
                      dry_run=index == 4)
        gate.post("/validate", json=body)
    return gate


def verify(store_url: str, kit: Kit) -> tuple[int, str]:
    result = cli("audit", "verify", "--store", store_url, "--key", str(kit.key("release")) + ".pub")
    return result.returncode, result.stdout.strip()


def execute(store_url: str, *statements: str) -> None:
    engine = open_store(store_url).write_engine
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def test_intact_log_verifies(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    server_with_events(server_factory, kit, store_url)
    assert verify(store_url, kit) == (0, "audit log intact: 12 events, 3 signed checkpoints verified")


def test_every_event_has_the_fields_security_teams_need(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    server_with_events(server_factory, kit, store_url)
    result = cli("audit", "--store", store_url, "--policy", str(kit.policy_path), "--output", "json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 12
    assert set(events[0]) >= {"time", "uid", "user", "groups", "namespace", "kind", "name", "operation", "environment",
                              "mode", "allowed", "reasons", "images", "breakGlass", "dryRun", "seq"}
    assert [e["dryRun"] for e in events].count(True) == 1
    assert events[1]["environment"] == "ci" and events[0]["reasons"] == ["no-environment"]


AUDIT_FILTERS = {
    "namespace": (["--namespace", "payments-ci"], 6),
    "user": (["--user", "user1"], 4),
    "denied": (["--denied"], 12),
    "reason": (["--reason", "mutable-tag"], 8),
    "digest": (["--image", "ghcr.io/acme/app@sha256:" + f"{3:064x}"], 1),
    "time range": (["--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z"], 12),
    "time range excluding all": (["--until", "2000-01-01T00:00:00Z"], 0),
}


@pytest.mark.parametrize(("args", "count"), AUDIT_FILTERS.values(), ids=AUDIT_FILTERS.keys())
def test_audit_query_filters(server_factory, kit: Kit, tmp_path: Path, args: list[str], count: int) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'q.db'}"
    server_with_events(server_factory, kit, url)
    result = cli("audit", "--store", url, "--policy", str(kit.policy_path), "--output", "json", *args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == count


@pytest.mark.parametrize(("on_failure", "allowed"), [("deny", False), ("allow", True)])
def test_audit_write_failure_follows_the_policy(server_factory, kit: Kit, store_url: str, on_failure: str,  # type: ignore[no-untyped-def]
                                                allowed: bool) -> None:
    document = policy_document(kit.root, extra={"audit": {"onWriteFailure": on_failure},
                                                "exemptImages": [{"repository": "registry.k8s.io/pause"}]})
    kit.policy_path.write_text(yaml.safe_dump(document))
    gate = server_factory(policy=kit.policy_path.read_text(), store=store_url)
    execute(store_url, "DROP TABLE audit_events")  # the log can no longer be written
    body = review(workload("Pod", ["registry.k8s.io/pause:3.9"], name="p", namespace="payments-ci"))
    response = gate.post("/validate", json=body).json()["response"]
    assert response["allowed"] is allowed
    if not allowed:
        assert response["status"]["message"] == (
            "[store-unavailable] Pod payments-ci/p: the decision could not be written to the audit log (store error); "
            "denied because the policy requires an audit trail. Retry shortly")
    assert "promotion_gate_audit_write_errors_total 1.0" in gate.get("/metrics").text
    # the event is never lost silently: it still reaches stdout, marked
    (event,) = gate.decisions(body["request"]["uid"])
    assert "auditStoreError" in event

    # what must keep working keeps working, even with onWriteFailure: deny
    tagged = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="legacy", namespace="payments-ci")
    scaled = {**tagged, "spec": {**tagged["spec"], "replicas": 0}}
    for never_blocked in (review(None, old=tagged, operation="DELETE"),
                          review(scaled, old=tagged, operation="UPDATE"),
                          review(workload("Pod", ["pause:1"], namespace="kube-system"))):
        assert gate.post("/validate", json=never_blocked).json()["response"]["allowed"] is True


# --- checkpoints: published, chained, on time --------------------------------------------------------


def published(gate: RunningServer) -> list[dict[str, Any]]:
    """The checkpoints the server published on stdout (its decision log)."""
    return [json.loads(line) for line in gate.log().splitlines() if line.startswith('{"msg":"audit checkpoint"')]


def with_audit(kit: Kit, **audit: object) -> str:
    document = policy_document(kit.root, extra={"audit": {"onWriteFailure": "deny", **audit}})
    kit.policy_path.write_text(yaml.safe_dump(document))
    return kit.policy_path.read_text()


def public_key(kit: Kit) -> str:
    return str(kit.key("release")) + ".pub"


def test_checkpoints_are_published_on_stdout_and_anchor_the_log(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    gate = server_with_events(server_factory, kit, store_url)
    assert [(c["checkpoint"], c["kind"], c["event"], c["every"], c["seconds"]) for c in published(gate)] == [
        (1, "seal", 1, 5, 60), (2, "seal", 6, 5, 60), (3, "seal", 11, 5, 60)]
    anchored = cli("audit", "verify", "--store", store_url, "--key", public_key(kit), "--anchor", str(gate.log_path))
    assert anchored.stdout == "audit log intact: 12 events, 3 signed checkpoints verified, anchored at checkpoint 3\n"


def test_a_checkpoint_is_signed_within_checkpoint_seconds(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    gate = server_factory(policy=with_audit(kit, checkpointEvery=1000, checkpointSeconds=1), store=store_url,
                          extra=["--server-key", str(kit.key("release"))])
    for index in range(3):
        gate.post("/validate", json=review(workload("Pod", [f"app{index}:1"], name=f"p{index}", namespace="team-x")))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and published(gate)[-1]["event"] < 3:
        time.sleep(0.2)
    assert published(gate)[0]["event"] == 1  # the first event is sealed at once
    assert published(gate)[-1]["event"] == 3  # the others within a second, though 1000 events are far away


def test_events_a_crashed_server_left_unsealed_are_sealed_when_it_starts_again(  # type: ignore[no-untyped-def]
        server_factory, kit: Kit, store_url: str) -> None:
    policy = with_audit(kit, checkpointEvery=1000, checkpointSeconds=5)
    gate = server_factory(policy=policy, store=store_url, extra=["--server-key", str(kit.key("release"))])
    for index in range(3):
        gate.post("/validate", json=review(workload("Pod", [f"app{index}:1"], name=f"p{index}", namespace="team-x")))
    gate.kill()  # kill -9: events 2 and 3 were stored, their checkpoint was not yet due
    store = open_store(store_url)
    assert [c.event_seq for c in store.checkpoints()] == [1]
    made = datetime.fromisoformat(next(e for e in store.events() if e.seq == 2).columns.time)
    due = (made + timedelta(seconds=5)).isoformat(timespec="microseconds").replace("+00:00", "Z")
    time.sleep(max(0.0, (made + timedelta(seconds=10.5) - datetime.now(UTC)).total_seconds()))
    assert verify(store_url, kit) == (1, "audit log TAMPERED: events 2-3 are not covered by a signed checkpoint, "
                                         f"although one was due by {due}: newer checkpoints were removed, or the server "
                                         "stopped before signing them (seal the log of a stopped server with "
                                         "'promotion-gate audit checkpoint')")
    restarted = server_factory(policy=policy, store=store_url, extra=["--server-key", str(kit.key("release"))])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not published(restarted):
        time.sleep(0.2)
    assert [(c["checkpoint"], c["event"]) for c in published(restarted)] == [(2, 3)]
    assert verify(store_url, kit) == (0, "audit log intact: 3 events, 2 signed checkpoints verified")


def test_the_server_refuses_a_key_the_policy_does_not_name_for_checkpoints(kit: Kit, tmp_path: Path) -> None:
    document = policy_document(kit.root, extra={"audit": {"checkpointKeys": ["ci"]}})
    kit.policy_path.write_text(yaml.safe_dump(document))
    args = ["serve", "--policy", str(kit.policy_path), "--store", f"sqlite:///{tmp_path / 's.db'}", "--cert-dir",
            str(tmp_path / "certs"), "--dev-certs", "--no-kubernetes"]
    wrong = cli(*args, "--server-key", str(kit.key("release")))
    release_id = kit.signing_key("release").key_id[:12]
    assert (wrong.returncode, wrong.stderr.splitlines()[-1]) == (
        1, f"Error: --server-key: its public key ({release_id}) is not listed under audit.checkpointKeys, so its "
           "checkpoints would not verify")
    missing = cli(*args)
    assert missing.stderr.splitlines()[-1] == (
        "Error: audit.checkpointKeys promises signed checkpoints: pass --server-key (or $PROMOTION_GATE_SERVER_KEY) "
        "with the private key of one of them")


def test_audit_anchor_keeps_the_newest_checkpoint_and_exposes_a_truncation(  # type: ignore[no-untyped-def]
        server_factory, kit: Kit, store_url: str, tmp_path: Path) -> None:
    server_with_events(server_factory, kit, store_url)
    anchor = tmp_path / "anchor.json"
    keep = ["audit", "anchor", "--store", store_url, "--key", public_key(kit), "--file", str(anchor)]
    first = cli(*keep)
    newest = open_store(store_url).checkpoint_head()
    assert newest is not None
    assert (first.returncode, first.stdout) == (0, f"anchored checkpoint 3 (event 11, {newest.created_at})\n")
    kept = anchor.read_text()
    assert json.loads(kept) == newest.to_json()

    attacker = attacker_on(store_url)  # delete the tail together with its checkpoints
    attacker.sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 2", "DELETE FROM audit_images WHERE event_seq > 5",
                 "DELETE FROM audit_events WHERE seq > 5")
    missing = (f"signed checkpoint 3 (event 11, {newest.created_at}) of the anchor is not in the log: the log was "
               "truncated or emptied after the anchor was taken")
    again = cli(*keep)
    assert (again.returncode, again.stdout) == (1, f"audit log TAMPERED: {missing}; {anchor} was kept\n")
    assert anchor.read_text() == kept
    assert verify(store_url, kit) == (0, "audit log intact: 5 events, 1 signed checkpoints verified")
    checked = cli("audit", "verify", "--store", store_url, "--key", public_key(kit), "--anchor", str(anchor))
    assert (checked.returncode, checked.stdout) == (1, f"audit log TAMPERED: {missing}\n")


def test_verify_reads_an_anchor_only_with_a_key(kit: Kit, tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("not a checkpoint\n")
    url = f"sqlite:///{tmp_path / 's.db'}"
    unkeyed = cli("audit", "verify", "--store", url, "--anchor", str(empty))
    assert unkeyed.returncode == 2
    assert "Error: --anchor needs --key: an anchor counts only when its signature is checked" in unkeyed.stderr
    nothing = cli("audit", "verify", "--store", url, "--key", public_key(kit), "--anchor", str(empty))
    assert nothing.returncode == 2
    assert (f'Invalid value for --anchor: {empty} holds no published audit checkpoint (a JSON line with "msg": '
            '"audit checkpoint")') in " ".join(nothing.stderr.split())


# --- queries re-check what they return ---------------------------------------------------------------


def test_queries_refuse_rows_whose_columns_contradict_their_event(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    gate = server_with_events(server_factory, kit, store_url)
    attacker_on(store_url).sql("UPDATE audit_events SET reasons = 'break-glass' WHERE seq = 2",
                               "INSERT INTO audit_images (event_seq, digest) VALUES (5, :d)", d=TRACED)
    problem = "event 2: its reasons column does not match its hashed content; run 'promotion-gate audit verify'"
    local = cli("audit", "--store", store_url, "--policy", str(kit.policy_path), "--reason", "break-glass")
    assert (local.returncode, local.stderr) == (1, f"error: audit log TAMPERED: {problem}\n")
    reader = {"Authorization": f"Bearer {kit.token('reader')}"}
    answer = gate.get("/api/v1/audit?reason=break-glass", headers=reader)
    assert (answer.status_code, answer.json()) == (409, {"error": f"audit log TAMPERED: {problem}", "code": 409})
    remote = cli("audit", "--reason", "break-glass", "--server", gate.url, "--token-file",
                 str(kit.token_file("reader")), "--ca-file", str(gate.ca))
    assert (remote.returncode, remote.stderr) == (1, f"error: {gate.url}: 409 audit log TAMPERED: {problem}\n")
    traced = gate.get(f"/api/v1/trace/{TRACED}", headers=reader)
    assert (traced.status_code, traced.json()["error"]) == (
        409, f"audit log TAMPERED: event 5: the images index names {TRACED}, which the event does not; run "
             "'promotion-gate audit verify'")


TRACED = "sha256:" + "7" * 64


# --- the writer: one bad or giant event costs only itself ---------------------------------------------


@contextmanager
def audit_lock_held(store_url: str) -> Iterator[None]:
    """Another writer holds the audit log's lock (SQLite's write lock, PostgreSQL's advisory lock)."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=10)
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
    else:
        with psycopg.connect(store_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (AUDIT_LOCK_KEY,))
            yield


def decision(index: int, *, uid: str = "", findings: int = 0, user: str = "dev@example.com") -> dict[str, Any]:
    """An event shaped like the server's: ``findings`` long finding lines make it large."""
    line = "[mutable-tag] Pod team-x/p spec.containers[0] \"c0\": image \"ghcr.io/acme/" + "x" * 400 + ":1\" is a tag"
    return {"time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "uid": uid or f"uid-{index}", "user": user, "groups": ["system:authenticated"], "namespace": "team-x",
            "kind": "Pod", "name": f"p{index}", "operation": "CREATE", "subResource": "", "dryRun": False,
            "environment": None, "mode": "enforce", "allowed": False, "reasons": ["mutable-tag"],
            "findings": [line] * findings,
            "images": [{"container": "c0", "field": "spec.containers[0]", "image": "app:1", "repository": "app",
                        "digest": TRACED, "records": [], "exempt": False}],
            "breakGlass": None, "breakGlassRefused": None, "skipped": "", "policy": ""}


def appended_together(log: ChainedDecisionLog, store_url: str, first: dict[str, Any],
                      waves: list[list[dict[str, Any]]]) -> list[int | str]:
    """Append ``first``, then each wave while the writer waits for the lock: the waves queue up behind it."""
    results: dict[int, int | str] = {}

    def append(key: int, event: dict[str, Any]) -> None:
        try:
            results[key] = log.append(event, timeout=30)
        except Exception as exc:  # what the request thread would see
            results[key] = f"{type(exc).__name__}: {exc}"

    threads: list[threading.Thread] = []
    everything = [first, *(event for wave in waves for event in wave)]
    with audit_lock_held(store_url):
        threads.append(threading.Thread(target=append, args=(0, first)))
        threads[0].start()
        time.sleep(0.5)  # the writer took it and waits for the lock
        offset = 1
        for wave in waves:
            for event in wave:
                threads.append(threading.Thread(target=append, args=(offset, event)))
                threads[-1].start()
                offset += 1
            time.sleep(0.5)
    for thread in threads:
        thread.join()
    return [results[key] for key in range(len(everything))]


def refuse_in_database(store_url: str, uid: str) -> None:
    """The database itself refuses one event (a constraint a DBA added): the worst case of a bad event."""
    if store_url.startswith("sqlite:///"):
        execute(store_url, f"CREATE TRIGGER refuse_one BEFORE INSERT ON audit_events WHEN NEW.uid = '{uid}' "
                           "BEGIN SELECT RAISE(ABORT, 'refused by the database'); END")
    else:
        execute(store_url, f"ALTER TABLE audit_events ADD CONSTRAINT refuse_one CHECK (uid <> '{uid}')")


def test_one_event_the_database_refuses_fails_alone(kit: Kit, store_url: str) -> None:
    store = open_store(store_url, migrate=True)
    refuse_in_database(store_url, "refused")
    log = ChainedDecisionLog(store, policy_file.load(kit.policy_path), Metrics(), server_key=kit.signing_key("release"))
    wave = [decision(i, uid="refused" if i == 20 else "") for i in range(1, 40)]
    results = appended_together(log, store_url, decision(0), [wave])
    log.close()
    failed = [r for r in results if isinstance(r, str)]
    assert len(failed) == 1 and failed[0].startswith("StoreError: store error: "), failed
    assert sorted(r for r in results if isinstance(r, int)) == list(range(1, 40))  # 39 of 40 in the chain
    assert verify(store_url, kit) == (0, "audit log intact: 39 events, 9 signed checkpoints verified")


def test_an_ordinary_decision_is_not_queued_behind_giant_ones(kit: Kit, store_url: str) -> None:
    store = open_store(store_url, migrate=True)
    log = ChainedDecisionLog(store, policy_file.load(kit.policy_path), Metrics())
    giants = [decision(i, findings=700) for i in range(1, 13)]  # about 300 KiB each, 3.6 MiB in all
    ordinary = decision(13)
    results = appended_together(log, store_url, decision(0), [giants, [ordinary]])
    log.close()
    assert results[-1] == 2  # committed right after the one in flight, ahead of every giant queued before it
    assert sorted(results[1:-1]) == list(range(3, 15))


def test_an_over_long_uid_or_username_never_fails_its_group(kit: Kit, store_url: str) -> None:
    # The server bounds what an event may hold (webhook/core/audit_limits.py); the store does not rely on
    # it: values the database could refuse (PostgreSQL: longer than a column, or a NUL) fit its columns,
    # and the event keeps them whole.
    store = open_store(store_url, migrate=True)
    long_user, long_uid, nul_user = "u" * 600 + "@example.com", "x" * 10000, "dev\u0000root@example.com"
    group = [decision(i) for i in range(40)]
    group[17] = decision(17, uid=long_uid, user=long_user)
    group[23] = decision(23, user=nul_user)
    outcome = store.append_audit([prepare(event) for event in group])
    assert [type(r).__name__ for r in outcome.results] == ["AuditRow"] * 40  # all 40 in one transaction
    for user, uid in ((long_user, long_uid), (nul_user, "uid-23")):
        (hit,) = store.query_audit(AuditQuery(user=user))
        assert hit.text is not None
        assert (json.loads(hit.text)["user"], json.loads(hit.text)["uid"]) == (user, uid)
    store.close()
    found = cli("audit", "--store", store_url, "--policy", str(kit.policy_path), "--user", long_user, "--output", "json")
    (event,) = map(json.loads, found.stdout.splitlines())
    assert (event["user"], event["uid"]) == (long_user, long_uid)
    unkeyed = cli("audit", "verify", "--store", store_url)
    assert unkeyed.stdout == "audit log intact: 40 events, 0 signed checkpoints verified\n"


# --- reads in bounded memory ----------------------------------------------------------------------------


def fill(store_url: str, kit: Kit, count: int, findings: int) -> None:
    """``count`` large events (each ``findings`` long finding lines) written through the real writer's path."""
    store = open_store(store_url, migrate=True)
    sealer = Sealer(kit.signing_key("release"), 5, 3600)
    for start in range(0, count, 10):
        store.append_audit([prepare(decision(i, findings=findings)) for i in range(start, min(start + 10, count))],
                           sealer)
    store.close()


PEAK_PROBE = """
import atexit, os, sys
def peak():
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    open(os.environ["PEAK_FILE"], "w").write(status)
atexit.register(peak)
from webhook.cli import main
main(sys.argv[1:], prog_name="promotion-gate")
"""


def peak_rss_kib(*args: str) -> tuple[int, str, int]:
    """Run the CLI; its exit status, stdout and peak resident memory (VmHWM, read as it exits)."""
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        done = subprocess.run([sys.executable, "-c", PEAK_PROBE, *args], capture_output=True, text=True,
                              env={**os.environ, "PEAK_FILE": str(peak_file)}, cwd=Path(__file__).parent.parent,
                              timeout=300)
        return done.returncode, done.stdout, int(peak_file.read_text())


def test_reading_a_log_of_large_events_stays_in_bounded_memory(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    fill(store_url, kit, 240, findings=900)  # 240 events of about 400 KiB: about 95 MiB of event text
    store = open_store(store_url)
    huge = prepare(decision(240, findings=5000))  # 2.3 MiB, beyond the API's read limit
    store.append_audit([huge], Sealer(kit.signing_key("release"), 5, 3600))
    store.close()
    gate = server_factory(policy=kit.policy_path.read_text(), store=store_url)
    reader = {"Authorization": f"Bearer {kit.token('reader')}"}
    before = gate.peak_memory_kib()
    assert before > 0

    first = gate.get("/api/v1/audit?limit=1000", headers=reader)
    page = first.json()
    assert len(first.content) <= 8 * 1024 * 1024 + 64 * 1024  # at most 8 MiB of events per answer
    assert [e["seq"] for e in page["events"]] == list(range(1, len(page["events"]) + 1))
    assert page["next"] == len(page["events"])
    seen = len(page["events"])
    while "next" in page:
        page = gate.get(f"/api/v1/audit?limit=1000&after={page['next']}", headers=reader).json()
        seen += len(page["events"])
    assert seen == 241
    omitted = page["events"][-1]
    assert omitted["omitted"] == (f"event of {len(huge.text(241))} characters is larger than the read limit of 1048576; "
                                  "read it with 'promotion-gate audit --store …'")
    traced = gate.get(f"/api/v1/trace/{TRACED}", headers=reader).json()
    assert len(traced["admissions"]) < 241 and traced["admissionsNext"] == traced["admissions"][-1]["seq"]
    shown = cli("trace", TRACED, "--server", gate.url, "--token-file", str(kit.token_file("reader")), "--ca-file",
                str(gate.ca))
    count = len(traced["admissions"])
    assert f"admissions: {count} (the first {count}; all of them: promotion-gate audit --image {TRACED})" in shown.stdout
    assert gate.peak_memory_kib() - before < 96 * 1024  # the whole log is 95 MiB; one answer holds 8 at most

    code, output, peak = peak_rss_kib("audit", "verify", "--store", store_url, "--key", public_key(kit))
    assert (code, output) == (0, "audit log intact: 241 events, 49 signed checkpoints verified\n")
    assert peak < 128 * 1024  # verify walks the chain in chunks, never the whole 95 MiB log
    code, output, peak = peak_rss_kib("audit", "--store", store_url, "--policy", str(kit.policy_path), "--output",
                                      "json", "--limit", "100000")
    assert (code, output.count("\n")) == (0, 241)
    assert peak < 128 * 1024  # printed as it is read


def test_any_unicode_json_carries_is_logged_printed_and_queried(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    gate = server_factory(policy=kit.policy_path.read_text(), store=store_url)
    user = "d\u00e9v \U0001f600 \u202eevil\u202c \ufeff@example.com"
    body = review(workload("Pod", ["app:1"], name="p\u00e9", namespace="payments-ci"), user=user)
    assert gate.post("/validate", json=body).status_code == 200
    # A lone surrogate is not text: refused at the door, and nothing reaches the log.
    raw = json.dumps(review(workload("Pod", ["app:1"], namespace="payments-ci"), user="x")).replace('"x"', '"\\ud800"')
    refused = gate.post("/validate", data=raw.encode(), headers={"Content-Type": "application/json"})
    assert (refused.status_code, refused.json()) == (400, {"error": "body is not valid JSON", "code": 400})
    shown = cli("audit", "--store", store_url, "--policy", str(kit.policy_path), "--user", user)
    assert shown.returncode == 0 and f"by {user} [mutable-tag]" in shown.stdout
    unkeyed = cli("audit", "verify", "--store", store_url)
    assert (unkeyed.stdout, unkeyed.stderr) == (
        "audit log intact: 1 events, 0 signed checkpoints verified\n",
        "note: no signed checkpoint in the log: only the chain's internal consistency was checked\n")


def test_a_running_server_notices_when_its_chain_is_cut_back(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    gate = server_with_events(server_factory, kit, store_url)
    attacker_on(store_url).sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 3",
                               "DELETE FROM audit_images WHERE event_seq > 8", "DELETE FROM audit_events WHERE seq > 8")
    gate.post("/validate", json=review(workload("Pod", ["app:1"], name="after", namespace="team-x")))
    assert ("audit log TAMPERED: the chain went backwards (event 9 was written after this server had written event 12): "
            "events or checkpoints were removed from the database; run 'promotion-gate audit verify --anchor'"
            ) in gate.log()
    assert "promotion_gate_audit_chain_regressions_total 1.0" in gate.get("/metrics").text
    anchored = cli("audit", "verify", "--store", store_url, "--key", public_key(kit), "--anchor", str(gate.log_path))
    assert anchored.returncode == 1 and "of the anchor is not in the log" in anchored.stdout


def test_audit_checkpoint_seals_the_newest_events_on_demand(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    server_with_events(server_factory, kit, store_url)  # checkpoints cover events 1, 6 and 11; 12 waits
    sealed = cli("audit", "checkpoint", "--store", store_url, "--key", str(kit.key("release")))
    newest = open_store(store_url).checkpoint_head()
    assert newest is not None and (newest.seq, newest.event_seq, newest.every, newest.seconds) == (4, 12, 5, 60)
    assert sealed.stdout == (f"checkpoint 4 at event 12 ({newest.event_hash[:16]}…) signed by "
                             f"{kit.signing_key('release').key_id[:12]}\n")
    again = cli("audit", "checkpoint", "--store", store_url, "--key", str(kit.key("release")))
    assert (again.returncode, again.stdout) == (0, "nothing to checkpoint: checkpoint 4 covers event 12\n")


def test_the_writer_refuses_an_event_no_server_should_write(kit: Kit, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", migrate=True)
    log = ChainedDecisionLog(store, policy_file.load(kit.policy_path), Metrics())
    giant = decision(1, findings=20000)  # about 9 Mi characters
    with pytest.raises(AuditEventTooLarge) as refused:
        log.append(giant, timeout=10)
    assert str(refused.value) == (f"audit event of {prepare(giant).size} characters is larger than the audit log's "
                                  "limit of 8388608")
    assert log.append(decision(2), timeout=10) == 1  # only that one
    log.close()


def test_a_log_written_before_chained_checkpoints_still_verifies_and_goes_on(kit: Kit, store_url: str) -> None:
    # A version-3 database: events and one unchained checkpoint, as the earlier release wrote them.
    store = open_store(store_url)
    with store.write_engine.begin() as conn:
        schema.schema_version.create(conn)
        for version, migration in enumerate(schema.MIGRATIONS[:3], start=1):
            migration(conn)
            conn.execute(schema.schema_version.insert().values(version=version))
        prev = GENESIS
        for seq in (1, 2, 3):
            text = canonical({**decision(seq), "seq": seq})
            digest = chain_hash(seq, prev, text)
            c = columns_of(json.loads(text))
            conn.execute(schema.audit_events.insert().values(
                seq=seq, time=c.time, uid=c.uid, namespace=c.namespace, username=c.username, allowed=c.allowed,
                reasons=c.reasons, event=text, prev_hash=prev, hash=digest))
            conn.execute(schema.audit_images.insert().values(event_seq=seq, digest=TRACED))
            prev = digest
        key = kit.signing_key("release")
        conn.execute(schema.audit_checkpoints.insert().values(
            event_seq=3, event_hash=prev, created_at="2026-01-01T00:00:00.000000Z", key_id=key.key_id,
            signature=base64.b64encode(key.sign(legacy_checkpoint_message(3, prev))).decode(), pruned_before=False))
    store.close()
    upgraded = cli("audit", "verify", "--store", store_url, "--key", public_key(kit))  # migrates to version 4
    assert (upgraded.returncode, upgraded.stdout, upgraded.stderr) == (
        0, "audit log intact: 3 events, 1 signed checkpoints verified\n",
        "note: the log has only unchained checkpoints of an older version; the guarantees of chained checkpoints "
        "start with the first event a current server writes\n")
    log = ChainedDecisionLog(open_store(store_url), policy_file.load(kit.policy_path), Metrics(), server_key=key)
    assert log.append(decision(4), timeout=10) == 4
    log.close()
    assert verify(store_url, kit) == (0, "audit log intact: 4 events, 2 signed checkpoints verified")


def test_a_new_schedule_applies_from_the_next_checkpoint_the_tighter_until_then(kit: Kit, store_url: str) -> None:
    store = open_store(store_url, migrate=True)
    policy = policy_file.load(kit.policy_path)  # checkpointEvery: 5
    key = kit.signing_key("release")
    before = ChainedDecisionLog(store, policy, Metrics(), server_key=key)
    for index in range(3):
        before.append(decision(index), timeout=10)
    before.close()  # a clean stop seals event 3; the next server runs with checkpointEvery: 100
    after = ChainedDecisionLog(store, replace(policy, audit_checkpoint_every=100), Metrics(), server_key=key)
    try:
        for index in range(3, 12):
            after.append(decision(index), timeout=10)
        # event 8 was due under the schedule checkpoint 2 promised (5 events); from there on, every 100
        assert [(c.event_seq, c.every) for c in store.checkpoints()] == [(1, 5), (3, 5), (8, 100)]
        assert verify(store_url, kit) == (0, "audit log intact: 12 events, 3 signed checkpoints verified")
    finally:
        after.close()
