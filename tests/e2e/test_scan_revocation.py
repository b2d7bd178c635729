"""A revocation, answered: where the digest still runs, in PolicyReports, a gauge, Events and ``scan``.

Against the real kube-apiserver, with a real SQLite store the CLI writes and the operator reads:
workloads run a promoted digest in two namespaces of the production environment; the digest is
revoked; within a bounded time the operator's PolicyReports, its gauge, its Events and
``promotion-gate scan --output json`` all name exactly the affected workloads. Then a replacement is
promoted, the workloads are rolled to it, and everything clears. Nothing is deleted or evicted by
Promotion Gate along the way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import running_workloads as rw
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import register_logs, unregister_logs
from tools.promotion_kit import Kit, make_kit
from tools.servers import REPO, free_port

pytestmark = pytest.mark.e2e

REVOKED = "ghcr.io/acme/payment-api@sha256:" + "a1" * 32
REPLACEMENT = "ghcr.io/acme/payment-api@sha256:" + "b2" * 32
OTHER = "ghcr.io/acme/web@sha256:" + "c3" * 32
REASON = "CVE-2026-1234: RCE in libfoo"
GROUP, VERSION, PLURAL = "wgpolicyk8s.io", "v1alpha2", "policyreports"
BOUND = 45.0  # seconds within which a revocation or a rollout must show (generous for a loaded CI machine)


@pytest.fixture(scope="module")
def policy_report_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "charts" / "promotion-gate" / "crds" / "policyreport.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/policyreports.wgpolicyk8s.io", "--timeout=60s")


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


@pytest.fixture
def batch(api_client: Any) -> Any:
    from kubernetes import client

    return client.BatchV1Api(api_client)


@pytest.fixture
def custom(api_client: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def report_results(custom: Any, namespace: str) -> list[tuple[str, str, str, str, str]] | None:
    """(result, rule, workload kind, workload name, runningPods) of the namespace's PolicyReport."""
    from kubernetes.client.exceptions import ApiException

    try:
        report = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "promotion-gate")
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return [(r["result"], r["rule"], r["resources"][0]["kind"], r["resources"][0]["name"],
             r.get("properties", {}).get("runningPods", "")) for r in report.get("results", [])]


def revocation_events(core: Any, namespace: str) -> list[tuple[str, str, str]]:
    events = core.list_namespaced_event(namespace, field_selector="reason=DigestRevoked").items
    return sorted((e.involved_object.kind, e.involved_object.name, e.message) for e in events)


def test_a_revocation_shows_where_the_digest_runs_and_clears_after_the_rollout(
        cluster: Cluster, core: Any, apps: Any, batch: Any, custom: Any, policy_report_crd: None,
        namespaces: rw.Namespaces, kit: Kit, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    for image in (REVOKED, OTHER):
        rw.promote_to_production(cluster, kit, store, image)
    shop, ledger_ns = namespaces.create("e2e-scan-shop"), namespaces.create("e2e-scan-ledger")
    api = rw.deployment(apps, core, shop, "payment-api", {"api": REVOKED}, replicas=2)
    web = rw.deployment(apps, core, shop, "web", {"web": OTHER}, replicas=1)
    ledger_pods = rw.statefulset(apps, core, ledger_ns, "ledger", {"ledger": REVOKED}, replicas=1)
    rw.cronjob(batch, ledger_ns, "report", {"report": REVOKED})
    ours = {shop, ledger_ns}

    port = free_port()
    operator = rw.ScanningOperator(cluster, [
        "--standalone", "--store", store, "--policy", str(kit.policy_path), "--namespace-scope", shop,
        "--scan", "--scan-interval", "600", "--scan-settle", "1", "--record-poll", "0.5",
        "--metrics-address", f"127.0.0.1:{port}"], tmp_path / "operator.log", port)
    register_logs(pytestconfig, {"operator": operator.log_path})
    operator.start()
    try:
        # Before: everything runs promoted digests; each namespace reports its workloads as passing.
        all_pass = {shop: [("pass", "promoted-digests", "Deployment", "payment-api", "2"),
                           ("pass", "promoted-digests", "Deployment", "web", "1")],
                    ledger_ns: [("pass", "promoted-digests", "CronJob", "report", "0"),
                                ("pass", "promoted-digests", "StatefulSet", "ledger", "1")]}
        rw.eventually(lambda: True if {n: report_results(custom, n) for n in ours} == all_pass else None,
                      timeout=BOUND, what="passing PolicyReports for the promoted workloads")
        assert operator.gauge(ours) == {}
        clean = rw.cli(cluster, "scan", "-n", shop, "-n", ledger_ns, "--store", store, "--policy",
                       str(kit.policy_path))
        assert (clean.returncode, clean.stdout) == (0, ""), clean.stderr
        assert clean.stderr == ("scanned 2 namespace(s): 4 workload(s), 4 running pod(s); all compliant\n")

        revoked = rw.cli(cluster, "revoke", REVOKED, "--env", "production", "--reason", REASON, "--by",
                         "security@acme.example", "--key", str(kit.key("release")), "--store", store, "--policy",
                         str(kit.policy_path))
        assert revoked.returncode == 0, revoked.stderr

        # The PolicyReports name exactly the affected workloads (the rest still pass).
        affected = {shop: [("fail", "not-promoted", "Deployment", "payment-api", "2"),
                           ("pass", "promoted-digests", "Deployment", "web", "1")],
                    ledger_ns: [("fail", "not-promoted", "CronJob", "report", "0"),
                                ("fail", "not-promoted", "StatefulSet", "ledger", "1")]}
        rw.eventually(lambda: True if {n: report_results(custom, n) for n in ours} == affected else None,
                      timeout=BOUND, what="the PolicyReports to show the revoked workloads")
        report = custom.get_namespaced_custom_object(GROUP, VERSION, shop, PLURAL, "promotion-gate")
        assert report["summary"] == {"pass": 1, "fail": 1, "warn": 0, "error": 0, "skip": 0}
        failed = report["results"][0]
        assert failed["message"] == line("Deployment", shop, "payment-api", "spec.template.spec.containers[0]", "api")
        assert failed["properties"] == {
            "container": "api", "image": REVOKED, "field": "spec.template.spec.containers[0]",
            "environment": "production", "revoked": "true", "runningPods": "2", "since": rw.STARTED,
            "inTemplate": "true"}
        assert failed["resources"] == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "payment-api",
                                        "namespace": shop, "uid": apps.read_namespaced_deployment(
                                            "payment-api", shop).metadata.uid}]
        table = cluster.kubectl("get", "policyreport", "-n", shop).stdout.splitlines()
        assert table[0].split() == ["NAME", "PASS", "FAIL", "WARN", "ERROR", "SKIP", "AGE"]
        assert table[1].split()[:6] == ["promotion-gate", "1", "1", "0", "0", "0"]

        # The gauge: running containers by namespace, environment, reason, and that a revocation is why.
        rw.eventually(lambda: True if operator.gauge(ours) == {
            (shop, "production", "not-promoted", "true"): 2.0,
            (ledger_ns, "production", "not-promoted", "true"): 1.0} else None,
            timeout=BOUND, what="the gauge to count the containers that run the revoked digest")

        # One Event on each affected workload, and only on those.
        rw.eventually(lambda: True if [e[:2] for e in revocation_events(core, shop)] == [("Deployment", "payment-api")]
                      and [e[:2] for e in revocation_events(core, ledger_ns)] == [
                          ("CronJob", "report"), ("StatefulSet", "ledger")] else None,
                      timeout=BOUND, what="DigestRevoked Events on the affected workloads")
        [(_, _, message)] = revocation_events(core, shop)
        assert message == (f'{REVOKED} was revoked from "production" by security@acme.example ({REASON}) and still '
                           f'runs in 2 pod(s) of Deployment {shop}/payment-api, container "api". Promotion Gate '
                           "reports it and stops nothing: roll out a promoted digest, or see docs/revoked-digest.md")

        # scan --output json lists exactly the same workloads, with the admission line.
        found = rw.cli(cluster, "scan", "-n", shop, "-n", ledger_ns, "--store", store, "--policy",
                       str(kit.policy_path), "--output", "json")
        assert found.returncode == 1, found.stderr
        result = json.loads(found.stdout)
        assert [(f["namespace"], f["workload"]["kind"], f["workload"]["name"], f["container"], f["reason"],
                 f["revoked"], f["pods"]["count"]) for f in result["findings"]] == sorted([
            (shop, "Deployment", "payment-api", "api", "not-promoted", True, 2),
            (ledger_ns, "CronJob", "report", "report", "not-promoted", True, 0),
            (ledger_ns, "StatefulSet", "ledger", "ledger", "not-promoted", True, 1)])
        by_workload = {f["workload"]["name"]: f for f in result["findings"]}
        assert by_workload["payment-api"]["line"] == failed["message"]
        assert by_workload["payment-api"]["pods"] == {"count": 2, "names": sorted(api.pods), "since": rw.STARTED}
        assert by_workload["ledger"]["pods"]["names"] == ledger_pods
        assert by_workload["report"]["line"] == line("CronJob", ledger_ns, "report",
                                                     "spec.jobTemplate.spec.template.spec.containers[0]", "report")
        text = rw.cli(cluster, "scan", "-n", shop, "--store", store, "--policy", str(kit.policy_path))
        assert text.stdout == (f"{failed['message']}\n    running in 2 pod(s) since {rw.STARTED}: "
                               f"{', '.join(sorted(api.pods))}; still in its template; the digest was revoked\n")
        assert text.stderr == ("scanned 1 namespace(s): 2 workload(s), 3 running pod(s); 1 workload(s) not "
                               "compliant (1 finding(s))\n")
        # Promotion Gate reports; it never deletes or evicts: every Pod is still there.
        assert sorted(p.metadata.name for p in core.list_namespaced_pod(shop).items) == sorted(api.pods + web.pods)

        # A policy change is a rescan at once: exempting the ledger namespace clears its report and its
        # series; taking the exemption back brings them back.
        original = kit.policy_path.read_text()
        document = yaml.safe_load(original)
        document["namespaces"]["exempt"] = [ledger_ns]
        kit.policy_path.write_text(yaml.safe_dump(document))
        rw.eventually(lambda: True if report_results(custom, ledger_ns) == [] and operator.gauge(ours) == {
            (shop, "production", "not-promoted", "true"): 2.0} else None,
            timeout=BOUND, what="the exempted namespace to report nothing")
        kit.policy_path.write_text(original)
        rw.eventually(lambda: True if report_results(custom, ledger_ns) == affected[ledger_ns] else None,
                      timeout=BOUND, what="the namespace to be judged again")
        assert "the policy file changed; rescanning" in operator.log()

        # A replacement is promoted and the workloads are rolled to it: the answer clears.
        rw.promote_to_production(cluster, kit, store, REPLACEMENT)
        rw.roll(apps, core, shop, api, {"api": REPLACEMENT})
        apps.patch_namespaced_stateful_set("ledger", ledger_ns, {"spec": {"template": rw.template(
            "ledger", {"ledger": REPLACEMENT})}})
        for pod in ledger_pods:
            core.delete_namespaced_pod(pod, ledger_ns, grace_period_seconds=0)
        ledger = apps.read_namespaced_stateful_set("ledger", ledger_ns)
        rw.run_pod(core, ledger_ns, "ledger-0", {"ledger": REPLACEMENT}, rw.owner(ledger, "StatefulSet", "apps/v1"),
                   started="2026-11-26T09:00:00Z")
        batch.patch_namespaced_cron_job("report", ledger_ns, {"spec": {"jobTemplate": {"spec": {"template": {
            "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "report", "image": REPLACEMENT}]}}}}}})
        rw.eventually(lambda: True if {n: report_results(custom, n) for n in ours} == all_pass else None,
                      timeout=BOUND, what="the PolicyReports to clear after the rollout")
        rw.eventually(lambda: True if operator.gauge(ours) == {} else None, timeout=BOUND,
                      what="the gauge to clear")
        cleared = rw.cli(cluster, "scan", "-n", shop, "-n", ledger_ns, "--store", store, "--policy",
                         str(kit.policy_path), "--output", "json")
        assert cleared.returncode == 0, cleared.stdout
        assert json.loads(cleared.stdout)["findings"] == []
        operator.check_alive()
    finally:
        code = operator.stop()
        unregister_logs(pytestconfig, ["operator"])
    assert code == 0, operator.log()


def line(kind: str, namespace: str, name: str, field: str, container: str) -> str:
    return (f'[not-promoted] {kind} {namespace}/{name} {field} "{container}": {REVOKED} has no promotion record for '
            'environment "production" (promoted to: ci, staging; revoked from production). Promote it: '
            f"promotion-gate promote {REVOKED} --to production")
