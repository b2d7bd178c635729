"""The rendered manifests/ install the documented way (``kubectl apply -k``), with the image swapped for
the local one by digest in a kustomize overlay, as an operator without Helm would do it.

Runs before the Helm release (same names, same namespace) and removes everything it installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster import kit
from tests.cluster.conftest import ClusterUnderTest, create_release_secrets, wait_enforced
from tools.cluster import config

MANIFESTS = kit.REPO / "manifests"
CHART_IMAGE = "ghcr.io/promotion-gate/promotion-gate"


@pytest.fixture(scope="module")
def installed(cluster: ClusterUnderTest, keys: kit.Keys) -> Iterator[Path]:
    kube = cluster.kube
    cluster.node.psql("CREATE DATABASE promotion_gate_manifests OWNER promotion_gate")
    overlay = cluster.work_dir / "manifests-overlay"
    overlay.mkdir()
    repository, digest = cluster.project_image.split("@")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kustomize takes a base only by a relative path.
        "resources": [os.path.relpath(MANIFESTS, overlay)],
        "images": [{"name": CHART_IMAGE, "newName": repository, "digest": digest}],
    }))
    try:
        # Step 1 of docs/install.md: the namespace and the two Secrets exist before the Pods.
        kube.kubectl("apply", "-f", str(MANIFESTS / "00-namespace.yaml"))
        create_release_secrets(kube, kit.RELEASE_NAMESPACE, cluster.node.postgres_dsn("promotion_gate_manifests"),
                               keys)
        kube.kubectl("apply", "-k", str(overlay))
        yield overlay
    finally:
        # docs/install.md's uninstall order: the webhook configuration first.
        kube.kubectl("delete", "validatingwebhookconfiguration", kit.RELEASE, "--ignore-not-found", check=False)
        kube.kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--wait=true", "--timeout=180s", check=False)
        kube.kubectl("delete", "namespace", kit.RELEASE_NAMESPACE, "--ignore-not-found", "--wait=true",
                     "--timeout=180s", check=False)
        kit.wait_for("the manifests' namespace and CRD to be gone", lambda: kube.kubectl(
            "get", "namespace", kit.RELEASE_NAMESPACE, check=False).returncode != 0 and kube.kubectl(
            "get", "crd", "promotions.promotion-gate.io", check=False).returncode != 0, timeout=180)


def test_kubectl_apply_k_runs_the_webhook_and_the_operator(installed: Path, cluster: ClusterUnderTest) -> None:
    kube = cluster.kube
    for deployment in ("promotion-gate", "promotion-gate-operator"):
        kube.kubectl("rollout", "status", f"deployment/{deployment}", "-n", kit.RELEASE_NAMESPACE, "--timeout=240s",
                     timeout=260)
    pods = kube.wait_running(kit.RELEASE_NAMESPACE, "app.kubernetes.io/component=webhook", 2)
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {cluster.project_image}
    assert cluster.project_image.startswith(config.REGISTRY)

    namespace = kube.namespace("manifests", "staging")
    wait_enforced(kube, namespace)
    result = kube.apply([kit.pod("api", namespace, "ghcr.io/acme/payment-api:1.4")])
    assert result.stderr == kit.denial(
        result.path,
        f'[mutable-tag] Pod {namespace}/api spec.containers[0] "app": image "ghcr.io/acme/payment-api:1.4" '
        "is a mutable tag; deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>")
    unrecorded = "ghcr.io/acme/payment-api@sha256:" + "ab" * 32
    result = kube.apply([kit.pod("api", namespace, unrecorded)])
    assert "[not-promoted]" in result.stderr and '(promoted to: none)' in result.stderr, result.stderr
