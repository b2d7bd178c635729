"""kill -9 under load, on both backends: nothing the server acknowledged is lost, and the chain still verifies.

Each cycle starts a real server, lets client threads send admissions (or record submissions) over TLS,
then SIGKILLs the server and all its workers at a random moment. An admission is acknowledged when
its client received a response: its audit event must be in the chain afterwards. A record is
acknowledged by 201: it must be in the store. `make test` runs a few cycles; `make faults` runs
PROMOTION_GATE_FAULT_CYCLES (50) of each and prints the figures.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import requests
import yaml

from tools.promotion_kit import Kit, ci_record, cli, envelope, make_kit, policy_document
from tools.reviews import review, workload
from tools.servers import RunningServer, start_server
from webhook.store import open_store

CYCLES = int(os.environ.get("PROMOTION_GATE_FAULT_CYCLES", "3"))
CLIENTS = 4
AUDIT_UNWRITTEN = "could not be written to the audit log"


@dataclass
class Load:
    """What the clients saw: acknowledged ids, and answers that say the event was not stored."""

    acknowledged: set[str] = field(default_factory=set)
    unwritten: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    kit = make_kit(tmp_path / "kit")
    document = policy_document(kit.root, extra={
        "store": {"timeoutSeconds": 10, "cacheSeconds": 30},
        "audit": {"onWriteFailure": "deny", "checkpointEvery": 7, "checkpointSeconds": 2}})
    kit.policy_path.write_text(yaml.safe_dump(document))
    return kit


def client(gate: RunningServer, send: Callable[[requests.Session, RunningServer, Load], None], load: Load,
           stop: threading.Event) -> None:
    with gate.session() as session:
        while not stop.is_set():
            try:
                send(session, gate, load)
            except (requests.RequestException, ValueError):
                if gate.process.poll() is not None:
                    return


def under_fire(tmp_path: Path, kit: Kit, store_url: str, send: Callable[[requests.Session, RunningServer, Load], None],
               seed: int) -> Iterator[Load]:
    """CYCLES times: start the server, load it from CLIENTS threads, kill -9 it at a random moment."""
    chance = random.Random(seed)
    for cycle in range(CYCLES):
        gate = start_server(tmp_path / f"cycle{cycle}", policy=kit.policy_path.read_text(), store=store_url,
                            extra=["--server-key", str(kit.key("release")), "--threads", "8"],
                            own_process_group=True)
        load = Load()
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(gate, send, load, stop)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(chance.uniform(0.3, 1.5))
        gate.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        yield load


def admit(session: requests.Session, gate: RunningServer, load: Load) -> None:
    uid = str(uuid.uuid4())
    namespace = random.choice(["payments-ci", "team-x", "payments-prod"])
    body = review(workload("Pod", [f"ghcr.io/acme/app{random.randrange(5)}:1"], name="p", namespace=namespace),
                  uid=uid)
    answer = session.post(gate.url + "/validate", json=body, timeout=30).json()["response"]
    with load.lock:
        load.acknowledged.add(uid)
        if AUDIT_UNWRITTEN in answer.get("status", {}).get("message", ""):
            load.unwritten.add(uid)


@pytest.mark.timeout(3600)
def test_kill_9_during_admissions_loses_no_acknowledged_event(tmp_path: Path, kit: Kit, store_url: str) -> None:
    seed = random.randrange(2**32)
    acknowledged, unwritten = set(), set()
    for load in under_fire(tmp_path, kit, store_url, admit, seed):
        acknowledged |= load.acknowledged
        unwritten |= load.unwritten
    store = open_store(store_url)
    chained = {orjson.loads(e.text or "{}").get("uid") for e in store.events()}
    store.close()
    lost = acknowledged - chained
    print(f"\nfaults: admissions, {store_url.split(':')[0]}, {CYCLES} kill -9 cycles, seed {seed}: "
          f"{len(acknowledged)} acknowledged, {len(chained)} in the chain, {len(lost)} lost, "
          f"{len(unwritten)} answered as not written")
    assert not unwritten, "every admission under load was written in time"
    assert not lost, f"seed {seed}: acknowledged but not in the chain: {sorted(lost)[:5]}"
    assert len(acknowledged) > CYCLES  # the load really ran

    restarted = start_server(tmp_path / "after", policy=kit.policy_path.read_text(), store=store_url,
                             extra=["--server-key", str(kit.key("release"))])
    restarted.stop()  # a clean stop seals what the last crash left unsealed
    # The anchor: every checkpoint any of the servers published on stdout, as a log pipeline keeps them.
    published = tmp_path / "published.log"
    published.write_text("".join(log.read_text(errors="replace") for log in sorted(tmp_path.glob("*/server-*.log"))))
    verified = cli("audit", "verify", "--store", store_url, "--key", str(kit.key("release")) + ".pub",
                   "--anchor", str(published))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"audit log intact: {len(chained)} events, ")


def submit_record(kit: Kit) -> Callable[[requests.Session, RunningServer, Load], None]:
    headers = {"Authorization": f"Bearer {kit.token('ci-bot')}"}
    def send(session: requests.Session, gate: RunningServer, load: Load) -> None:
        digest = "sha256:" + uuid.uuid4().hex * 2
        signed = envelope(kit, ci_record(digest=digest), "ci")
        answer = session.post(gate.url + "/api/v1/records", json=signed.to_json(), headers=headers, timeout=30)
        if answer.status_code == 201:
            with load.lock:
                load.acknowledged.add(digest)

    return send


@pytest.mark.timeout(3600)
def test_kill_9_during_record_submission_loses_no_acknowledged_record(tmp_path: Path, kit: Kit,
                                                                      store_url: str) -> None:
    seed = random.randrange(2**32)
    acknowledged: set[str] = set()
    for load in under_fire(tmp_path, kit, store_url, submit_record(kit), seed):
        acknowledged |= load.acknowledged
    store = open_store(store_url)
    stored = {digest for digest, found in store.records_for_digests(sorted(acknowledged)).items() if found}
    total = store.record_count()
    store.close()
    lost = acknowledged - stored
    print(f"\nfaults: records, {store_url.split(':')[0]}, {CYCLES} kill -9 cycles, seed {seed}: "
          f"{len(acknowledged)} acknowledged (201), {total} stored, {len(lost)} lost")
    assert not lost, f"seed {seed}: acknowledged but not stored: {sorted(lost)[:5]}"
    assert len(acknowledged) > CYCLES
