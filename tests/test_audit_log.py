"""The tamper-evident decision log on both backends: chain, checkpoints, verify, prune, failure policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tools.promotion_kit import Kit, cli, make_kit, policy_document
from tools.reviews import review, workload
from tools.servers import RunningServer
from webhook.store import open_store
from webhook.store.audit_chain import canonical, chain_hash


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
    assert verify(store_url, kit) == (0, "audit log intact: 12 events, 2 signed checkpoints verified")


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


TAMPERING = {
    "edited": (["UPDATE audit_events SET event = replace(event, '\"allowed\":false', '\"allowed\":true') "
                "WHERE seq = 7"], "audit log TAMPERED: event 7 was altered: its content does not match its hash"),
    "deleted": (["DELETE FROM audit_events WHERE seq = 5"],
                "audit log TAMPERED: event 5 removed: the chain jumps from event 4 to 6"),
    "reordered": (["UPDATE audit_events SET seq = 100 WHERE seq = 8", "UPDATE audit_events SET seq = 8 WHERE seq = 9",
                   "UPDATE audit_events SET seq = 9 WHERE seq = 100"],
                  "audit log TAMPERED: event 8 does not follow event 7: the chain was reordered or an earlier event "
                  "was altered"),
}


@pytest.mark.parametrize(("statements", "message"), TAMPERING.values(), ids=TAMPERING.keys())
def test_verify_names_the_first_tampered_event(server_factory, kit: Kit, store_url: str, statements: list[str],  # type: ignore[no-untyped-def]
                                               message: str) -> None:
    server_with_events(server_factory, kit, store_url)
    execute(store_url, *statements)
    assert verify(store_url, kit) == (1, message)


def test_a_rewritten_chain_is_caught_by_the_signed_checkpoint(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    # An attacker with database access edits event 3 and recomputes every later hash: the chain is
    # internally consistent again, but no longer matches what the server signed.
    server_with_events(server_factory, kit, store_url)
    store = open_store(store_url)
    rows = store.audit_rows()
    prev = rows[1].hash
    with store.write_engine.begin() as conn:
        for row in rows[2:]:
            event = json.loads(row.event)
            if row.seq == 3:
                event["allowed"] = True
            text = canonical(event)
            digest = chain_hash(row.seq, prev, text)
            conn.execute(sa.text("UPDATE audit_events SET event = :e, prev_hash = :p, hash = :h WHERE seq = :s"),
                         {"e": text, "p": prev, "h": digest, "s": row.seq})
            prev = digest
    assert verify(store_url, kit) == (1, "audit log TAMPERED: event 5 does not match signed checkpoint: the chain "
                                         "was rewritten from here or earlier")


def test_truncated_tail_is_caught_by_the_signed_checkpoint(server_factory, kit: Kit, store_url: str) -> None:  # type: ignore[no-untyped-def]
    server_with_events(server_factory, kit, store_url)
    execute(store_url, "DELETE FROM audit_images WHERE event_seq > 9", "DELETE FROM audit_events WHERE seq > 9")
    assert verify(store_url, kit) == (1, "audit log TAMPERED: events after 9 removed: a signed checkpoint covers "
                                         "event 10")


def test_prune_up_to_a_checkpoint_keeps_the_log_verifiable(server_factory, kit: Kit, store_url: str,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    server_with_events(server_factory, kit, store_url)
    archive = tmp_path / "archive.jsonl"
    result = cli("audit", "prune", "--store", store_url, "--key", str(kit.key("release")) + ".pub",
                 "--before", "2999-01-01T00:00:00Z", "--archive", str(archive))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pruned 10 events up to event 10 (checkpoint 2)"
    assert [json.loads(line)["seq"] for line in archive.read_text().splitlines()] == list(range(1, 11))
    assert verify(store_url, kit) == (0, "audit log intact: 2 events, 2 signed checkpoints verified")
    execute(store_url, "DELETE FROM audit_events WHERE seq = 11")
    assert verify(store_url, kit)[0] == 1


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
