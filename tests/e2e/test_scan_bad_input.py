"""``scan``, ``trace`` and the scanning operator facing what a real cluster holds: malformed images, owners
of kinds nobody lists, ownerReferences in a loop, a namespace deleted under its Pods, an API server that
never answers. Each becomes a finding, a note or an error with a clear message — never a traceback,
never a crash loop.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e import gate as gate_mod
from tests.e2e import running_workloads as rw
from tests.e2e.cluster import Cluster
from tools.promotion_kit import make_kit
from tools.servers import free_port

pytestmark = pytest.mark.e2e

DIGEST = "sha256:" + "e" * 64


@pytest.fixture
def digest_only(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(gate_mod.DIGEST_ONLY_POLICY)
    return path


def test_malformed_images_and_odd_owners_are_findings(cluster: Cluster, core: Any, apps: Any,
                                                      namespaces: rw.Namespaces, digest_only: Path) -> None:
    ns = namespaces.create("e2e-scan-odd", environment=None)
    rw.run_pod(core, ns, "bad-digest", {"api": "ghcr.io/acme/api@sha256:abc"})
    rw.run_pod(core, ns, "long-tag", {"api": "ghcr.io/acme/api:" + "t" * 200})
    # An Argo Rollout's Pod: a controller of a kind Promotion Gate does not read.
    rollout = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "checkout", "uid": str(uuid.uuid4()),
               "controller": True}
    rw.run_pod(core, ns, "checkout-6f8d", {"app": "ghcr.io/acme/checkout:2.0"}, rollout)
    # ownerReferences that loop: the ReplicaSet claims to be controlled by its own Pod.
    looping = apps.create_namespaced_replica_set(ns, {
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "loop"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "loop"}},
                 "template": rw.template("loop", {"loop": f"ghcr.io/acme/loop@{DIGEST}"})}})
    pod = rw.run_pod(core, ns, "loop-0", {"loop": "ghcr.io/acme/loop:1"}, rw.owner(looping, "ReplicaSet", "apps/v1"),
                     labels={"app": "loop"})
    apps.patch_namespaced_replica_set("loop", ns, {"metadata": {"ownerReferences": [rw.owner(pod, "Pod", "v1")]}})

    result = rw.cli(cluster, "scan", "-n", ns, "--policy", str(digest_only))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f'[invalid-reference] Pod {ns}/bad-digest spec.containers[0] "api": image "ghcr.io/acme/api@sha256:abc" is not '
        "a valid reference: sha256 digest must be exactly 64 lowercase hex characters (got 3)",
        f"    running in 1 pod(s) since {rw.STARTED}: bad-digest",
        f'[invalid-reference] Pod {ns}/long-tag spec.containers[0] "api": image "ghcr.io/acme/api:{"t" * 200}" is not '
        "a valid reference: tag is longer than 128 characters",
        f"    running in 1 pod(s) since {rw.STARTED}: long-tag",
        f'[mutable-tag] ReplicaSet {ns}/loop spec.template.spec.containers[0] "loop": image "ghcr.io/acme/loop:1" is '
        "a mutable tag; deploy by digest: ghcr.io/acme/loop@sha256:<digest>",
        f"    running in 1 pod(s) since {rw.STARTED}: loop-0",
        f'[mutable-tag] Pod {ns}/checkout-6f8d spec.containers[0] "app": image "ghcr.io/acme/checkout:2.0" is a mutable '
        "tag; deploy by digest: ghcr.io/acme/checkout@sha256:<digest>",
        f"    running in 1 pod(s) since {rw.STARTED}: checkout-6f8d",
    ]
    assert result.stderr == (
        f"note: Rollout {ns}/checkout (owner of 1 pod(s)) was not listed (a kind Promotion Gate does not read, or "
        "already deleted): its Pods are judged, its own template is not\n"
        f"scanned 1 namespace(s): 4 workload(s), 4 running pod(s); 4 workload(s) not compliant (4 finding(s))\n")
    report = json.loads(rw.cli(cluster, "scan", "-n", ns, "--policy", str(digest_only), "--output", "json").stdout)
    assert [(f["workload"]["kind"], f["workload"]["name"], f["reason"]) for f in report["findings"]] == [
        ("Pod", "bad-digest", "invalid-reference"), ("Pod", "long-tag", "invalid-reference"),
        ("ReplicaSet", "loop", "mutable-tag"), ("Rollout", "checkout", "mutable-tag")]


def finalize_away(core: Any, name: str) -> None:
    """Delete a namespace for good although its Pods stay: what a scan meets when one goes mid-listing.

    There is no namespace controller here to empty it, so its finalizer is removed by hand.
    """
    core.delete_namespace(name)
    core.replace_namespace_finalize(name, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                                           "spec": {"finalizers": []}})

    def gone() -> bool | None:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            return True if exc.status == 404 else None
        return None

    gate_mod.eventually(gone, timeout=30, what=f"namespace {name} to be gone")


def test_a_deleted_namespace_is_reported_not_judged(cluster: Cluster, core: Any, namespaces: rw.Namespaces,
                                                    digest_only: Path) -> None:
    ns = namespaces.create("e2e-scan-gone", environment=None)
    rw.run_pod(core, ns, "orphan", {"api": "ghcr.io/acme/api:1.4"})
    finalize_away(core, ns)
    assert [p.metadata.name for p in core.list_namespaced_pod(ns).items] == ["orphan"]  # still stored

    everywhere = rw.cli(cluster, "scan", "--policy", str(digest_only), "--output", "json")
    assert everywhere.returncode in (0, 1), everywhere.stderr
    report = json.loads(everywhere.stdout)
    assert f'namespace "{ns}" no longer exists (deleted during the scan): 1 object(s) in it were not judged' \
        in report["notes"]
    assert ns not in {f["namespace"] for f in report["findings"]}
    assert ns not in {n["name"] for n in report["namespaces"]}

    named = rw.cli(cluster, "scan", "-n", ns, "--policy", str(digest_only))
    assert (named.returncode, named.stdout, named.stderr) == (2, "", f'error: namespace "{ns}" does not exist\n')


def test_an_api_server_that_never_answers(cluster: Cluster, digest_only: Path, tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    with rw.silent_api_server(cluster, tmp_path) as (server, kubeconfig):
        scanned = rw.cli(cluster, "scan", "--policy", str(digest_only), "--request-timeout", "2",
                         kubeconfig=kubeconfig, timeout=60)
        assert (scanned.returncode, scanned.stdout, scanned.stderr) == (
            3, "", f"error: the Kubernetes API server {server} did not answer within 2s (list deployments)\n")

        traced = rw.cli(cluster, "trace", DIGEST, "--store", store, "--policy", str(kit.policy_path),
                        "--request-timeout", "2", kubeconfig=kubeconfig, timeout=60)
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout.splitlines()[-1] == (
            f"running now: unknown (the Kubernetes API server {server} did not answer within 2s (list replicasets))")

        # The operator keeps running, says why it cannot scan, and stops cleanly: no crash loop.
        port = free_port()
        operator = rw.ScanningOperator(cluster, [
            "--standalone", "--store", store, "--policy", str(kit.policy_path), "--namespace-scope", "none",
            "--scan", "--request-timeout", "3", "--metrics-address", f"127.0.0.1:{port}"], tmp_path / "operator.log", port,
            kubeconfig=kubeconfig)
        operator.start()
        try:
            rw.eventually(lambda: True if "did not answer within 3s (list pods); listing pods again in" in
                          operator.log() else None, timeout=60, what="the operator to report the silent API server")
            time.sleep(2)
            operator.check_alive()
            assert 'promotion_gate_scans_total{result="ok"} 0.0' in operator.metrics()
        finally:
            code = operator.stop()
        assert code == 0, operator.log()
