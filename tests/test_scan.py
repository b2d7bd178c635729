"""Scanning what runs, without a cluster: owner chains, what is judged and how, the store read in batches.

The objects are what the API server lists (plain dicts, read by ``running.observe``); the store is a
real SQLite file with signed records; the core is the admission core itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from tools.promotion_kit import DIGEST, IMAGE, REPOSITORY, Kit, ci_record, envelope, make_kit
from webhook import policy_file, scan
from webhook.core import policy as policy_mod
from webhook.core.promotion import NoRecords
from webhook.core.records import RecordKind
from webhook.ledger import Ledger, Stored
from webhook.operator import scanner
from webhook.running import Inventory, NamespaceInfo, Observed, chain, observe, place, where_it_runs
from webhook.scan_metrics import ScanMetrics
from webhook.scan_records import BatchedRecordView
from webhook.store import open_store

DIGEST_ONLY = policy_mod.Policy(unmapped=policy_mod.Unmapped.DIGEST_ONLY)
PINNED = f"ghcr.io/acme/api@sha256:{'1' * 64}"
TAGGED = "ghcr.io/acme/api:1.4"


def meta(name: str, uid: str, owner: tuple[str, str, str] | None = None, namespace: str = "shop",
         **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, **extra}
    if owner is not None:
        kind, owner_name, owner_uid = owner
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner_name, "uid": owner_uid,
                                        "controller": True}]
    return metadata


def pod(name: str, uid: str, image: str = PINNED, owner: tuple[str, str, str] | None = None, phase: str = "Running",
        **extra: Any) -> Observed:
    return observe({"metadata": meta(name, uid, owner, **extra),
                    "spec": {"containers": [{"name": "api", "image": image}], "nodeName": "n1"},
                    "status": {"phase": phase, "startTime": "2026-11-25T10:00:00Z"}}, kind="Pod", api_version="v1")


def workload(kind: str, name: str, uid: str, image: str = PINNED, owner: tuple[str, str, str] | None = None,
             annotations: dict[str, str] | None = None) -> Observed:
    spec: dict[str, Any] = {"template": {"metadata": {}, "spec": {"containers": [{"name": "api", "image": image}]}}}
    if kind == "CronJob":
        spec = {"jobTemplate": {"spec": spec}}
    metadata = meta(name, uid, owner, annotations=annotations or {})
    api_version = "batch/v1" if kind in ("Job", "CronJob") else "apps/v1"
    return observe({"metadata": metadata, "spec": spec}, kind=kind, api_version=api_version)


def inventory(*objects: Observed, namespaces: tuple[str, ...] = ("shop",)) -> Inventory:
    return Inventory(namespaces={n: NamespaceInfo(n) for n in namespaces}, objects=list(objects))


DEPLOYMENT = workload("Deployment", "api", "d1")
REPLICA_SET = workload("ReplicaSet", "api-7d9", "r1", owner=("Deployment", "api", "d1"))
CRONJOB = workload("CronJob", "nightly", "c1")
JOB = workload("Job", "nightly-29", "j1", owner=("CronJob", "nightly", "c1"))


@pytest.mark.parametrize(("objects", "subject", "top", "judged_as", "field"), [
    ((DEPLOYMENT, REPLICA_SET), pod("api-7d9-x", "p1", owner=("ReplicaSet", "api-7d9", "r1")),
     "Deployment shop/api", "Deployment shop/api", "spec.template.spec.containers[0]"),
    ((CRONJOB, JOB), pod("nightly-29-x", "p1", owner=("Job", "nightly-29", "j1")),
     "CronJob shop/nightly", "CronJob shop/nightly", "spec.jobTemplate.spec.template.spec.containers[0]"),
    # the Deployment was not listed (deleted, or no rights): named from the ReplicaSet's ownerReference
    ((REPLICA_SET,), pod("api-7d9-x", "p1", owner=("ReplicaSet", "api-7d9", "r1")),
     "Deployment shop/api", "Deployment shop/api", "spec.template.spec.containers[0]"),
    # a kind nobody lists: the workload is named, the admission line stays the Pod's
    ((), pod("checkout-x", "p1", owner=("Rollout", "checkout", "ro1")), "Rollout shop/checkout", "Pod shop/checkout-x",
     "spec.containers[0]"),
    # a uid that names another object is not followed
    ((workload("ReplicaSet", "other", "r1"),), pod("api-7d9-x", "p1", owner=("ReplicaSet", "api-7d9", "r1")),
     "ReplicaSet shop/api-7d9", "ReplicaSet shop/api-7d9", "spec.template.spec.containers[0]"),
    # mirror Pods are owned by their Node, which is cluster-scoped
    ((), pod("etcd-n1", "p1", owner=("Node", "n1", "n1")), "Node n1", "Pod shop/etcd-n1", "spec.containers[0]"),
])
def test_owner_chains(objects: tuple[Observed, ...], subject: Observed, top: str, judged_as: str,
                      field: str) -> None:
    index = inventory(*objects, subject).by_uid()
    placement = place(subject, index)
    assert (placement.top.display_name, placement.judged_as.display_name) == (top, judged_as)
    report = scan.run(inventory(*objects, subject), DIGEST_ONLY, NoRecords(), observed_at="t")
    assert top in {w.display_name for w in report.workloads}


def test_owner_loops_and_deep_chains_end() -> None:
    looping_set = workload("ReplicaSet", "loop", "r1", owner=("Pod", "loop-0", "p1"))
    looping_pod = pod("loop-0", "p1", owner=("ReplicaSet", "loop", "r1"))
    assert [ref.name for ref, _ in chain(looping_pod, inventory(looping_set, looping_pod).by_uid())] == ["loop-0",
                                                                                                       "loop"]
    deep = [workload("ReplicaSet", f"level-{i}", f"u{i}", owner=("ReplicaSet", f"level-{i + 1}", f"u{i + 1}"))
            for i in range(50)]
    leaf = pod("leaf", "p", owner=("ReplicaSet", "level-0", "u0"))
    assert len(chain(leaf, inventory(*deep, leaf).by_uid())) == 8


def test_what_a_scan_judges() -> None:
    report = scan.run(inventory(
        DEPLOYMENT, REPLICA_SET,
        pod("api-7d9-a", "p1", TAGGED, owner=("ReplicaSet", "api-7d9", "r1")),
        pod("api-7d9-b", "p2", TAGGED, owner=("ReplicaSet", "api-7d9", "r1")),
        pod("done", "p3", TAGGED, phase="Succeeded"),  # finished: runs nothing
        workload("Deployment", "idle", "d2", TAGGED),  # scaled to zero: its template says what runs next
        pod("gone", "p4", TAGGED, namespace="deleted"),  # its namespace is not there any more
        pod("system", "p5", TAGGED, namespace="kube-system"),  # exempt, as at admission
        namespaces=("shop", "kube-system")), DIGEST_ONLY, NoRecords(), observed_at="t")
    assert (list(report.namespaces), report.exempt) == (["shop"], ["kube-system"])
    assert [(f.workload.name, f.pod_count, f.pod_names, f.in_template) for f in report.findings] == [
        ("api", 2, ["api-7d9-a", "api-7d9-b"], False), ("idle", 0, [], True)]
    assert report.findings[0].finding.line == (
        '[mutable-tag] Deployment shop/api spec.template.spec.containers[0] "api": image "ghcr.io/acme/api:1.4" is a '
        "mutable tag; deploy by digest: ghcr.io/acme/api@sha256:<digest>")
    assert scan.detail_line(report.findings[1]) == "    no pod runs it now; the Deployment's template references it"
    assert report.notes == ['namespace "deleted" no longer exists (deleted during the scan): 1 object(s) in it were '
                            "not judged"]
    assert dict(report.noncompliant_containers) == {("shop", "", "mutable-tag", "false"): 2}
    assert (report.exit_code, scan.summary_line(report)) == (
        1, "scanned 1 namespace(s): 2 workload(s), 2 running pod(s); 2 workload(s) not compliant (2 finding(s))")


def test_break_glass_on_the_workload_is_reported_with_its_pods() -> None:
    glass = {"promotion-gate.io/break-glass": "INC-4711"}
    report = scan.run(inventory(
        workload("Deployment", "api", "d1", TAGGED, annotations=glass),
        workload("ReplicaSet", "api-7d9", "r1", TAGGED, owner=("Deployment", "api", "d1")),
        pod("api-7d9-a", "p1", TAGGED, owner=("ReplicaSet", "api-7d9", "r1"))), DIGEST_ONLY, NoRecords(),
        observed_at="t")
    [found] = report.findings
    assert (found.break_glass, found.pod_count, found.in_template) == ("INC-4711", 1, True)
    assert scan.detail_line(found).endswith("; break-glass: INC-4711")


def test_where_a_digest_runs_by_image_or_by_what_the_runtime_pulled() -> None:
    digest = "sha256:" + "1" * 64
    resolved = observe({"metadata": meta("debug", "p9"), "spec": {"containers": [{"name": "sh", "image": TAGGED}]},
                        "status": {"phase": "Running", "containerStatuses": [
                            {"name": "sh", "imageID": f"docker-pullable://ghcr.io/acme/api@{digest}",
                             "state": {"running": {"startedAt": "2026-11-25T11:00:00Z"}}}]}},
                       kind="Pod", api_version="v1")
    answer = where_it_runs(inventory(DEPLOYMENT, REPLICA_SET, pod("api-7d9-a", "p1", owner=("ReplicaSet", "api-7d9",
                                                                                          "r1")),
                                     pod("finished", "p2", phase="Failed"), resolved), digest, "now")
    assert [(w.workload.display_name, [(c.pod, c.matched_by, c.since) for c in w.containers])
            for w in answer.workloads] == [
        ("Deployment shop/api", [("api-7d9-a", "image", "2026-11-25T10:00:00Z")]),
        ("Pod shop/debug", [("debug", "imageID", "2026-11-25T11:00:00Z")])]


# --- the store, read in batches --------------------------------------------------------------------


@dataclass
class Records:
    kit: Kit
    ledger: Ledger

    def promote_ci(self, digest: str = DIGEST) -> None:
        self._submit(ci_record(digest=digest))

    def revoke_ci(self, digest: str = DIGEST) -> None:
        self._submit(ci_record(digest=digest, kind=RecordKind.REVOCATION, reason="CVE-2026-1234", source=None,
                               tests=None, scan=None))

    def _submit(self, record: Any) -> None:
        outcome = self.ledger.submit(envelope(self.kit, record, "ci").to_json(), "ci", lambda _e: True)
        assert isinstance(outcome, Stored), outcome


@pytest.fixture
def records(tmp_path: Path) -> Records:
    kit = make_kit(tmp_path / "kit")
    return Records(kit, Ledger(open_store(f"sqlite:///{tmp_path / 's.db'}", migrate=True),
                               policy_file.load(kit.policy_path)))


def test_every_digest_is_read_in_batches_and_only_changes_are_read_again(records: Records) -> None:
    ledger = records.ledger
    digests = [f"sha256:{i:064x}" for i in range(1, 1201)]
    for digest in (DIGEST, *digests[:3]):
        records.promote_ci(digest)
    view = BatchedRecordView(ledger.store, ledger.policy)
    subjects = [(REPOSITORY, d) for d in (DIGEST, *digests)]
    view.prefetch(subjects)
    assert view.queries == 1 + 3  # the version, then 1,201 digests in batches of 500
    assert view.statuses([(REPOSITORY, DIGEST)], "ci")[(REPOSITORY, DIGEST)].state.value == "promoted"

    view.queries = 0
    view.prefetch(subjects)
    assert view.queries == 1  # nothing new: the version alone

    records.revoke_ci()
    view.queries = 0
    view.prefetch(subjects)
    assert view.queries == 3  # the version, the new records, and the one digest they name
    status = view.statuses([(REPOSITORY, DIGEST)], "ci")[(REPOSITORY, DIGEST)]
    assert (status.state.value, status.detail) == ("not-promoted", "revoked")
    revoked = view.revocation((REPOSITORY, DIGEST), "ci")
    assert revoked is not None and revoked.record.reason == "CVE-2026-1234"


def test_a_revoked_digest_is_reported_as_revoked(records: Records) -> None:
    ledger = records.ledger
    records.promote_ci()
    records.revoke_ci()
    objects = Inventory(namespaces={"payments-ci": NamespaceInfo("payments-ci")},
                        objects=[pod("api", "p1", IMAGE, namespace="payments-ci")])
    report = scan.run(objects, ledger.policy, BatchedRecordView(ledger.store, ledger.policy), observed_at="t")
    [found] = report.findings
    assert (found.revoked, found.environment, str(found.reason)) == (True, "ci", "not-promoted")
    assert dict(report.noncompliant_containers) == {("payments-ci", "ci", "not-promoted", "true"): 1}
    metrics = ScanMetrics()
    metrics.scanned(report, 1.0, 0.5)
    exported = generate_latest(metrics.registry).decode()
    assert ('promotion_gate_noncompliant_containers{environment="ci",namespace="payments-ci",reason="not-promoted",'
            'revoked="true"} 1.0') in exported
    assert scanner.revocation_message(found, None) == (
        f'{IMAGE} was revoked from "ci" and still runs in 1 pod(s) of Pod payments-ci/api, container "api". '
        "Promotion Gate reports it and stops nothing: roll out a promoted digest, or see docs/revoked-digest.md")


def test_a_broken_policy_edit_keeps_the_last_good_policy(tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    loaded = policy_file.load(kit.policy_path)
    source = scanner.PolicySource(loaded, kit.policy_path)
    assert source.changed() is False
    kit.policy_path.write_text(kit.policy_path.read_text().replace("defaultMode: enforce", "defaultMode: audit"))
    assert source.changed() is True and source.policy.default_mode is policy_mod.Mode.AUDIT
    kit.policy_path.write_text("environments: [")
    assert source.changed() is False and source.policy.default_mode is policy_mod.Mode.AUDIT


def test_the_cycle_collector_comes_back_after_every_listing() -> None:
    # Paused while a listing decodes (acyclic objects); left off, cyclic garbage elsewhere would pile up.
    import gc

    from webhook.cluster_listing import collector_paused

    assert gc.isenabled()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a listing that fails")
    assert gc.isenabled()
