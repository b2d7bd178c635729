"""Callers of /validate who are not the API server, against a real kube-apiserver.

kube-apiserver here is started with an AdmissionConfiguration whose kubeconfig presents a client
certificate to every webhook (``tests/e2e/cluster.py``). A webhook started with that certificate's CA
as ``--validate-client-ca`` judges what the API server sends, and refuses everyone else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes.client.exceptions import ApiException

from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import solo_gate, start_webhook
from tools.reviews import review, workload
from webhook import certs

pytestmark = pytest.mark.e2e

NO_CERTIFICATE = {"error": "/validate needs a client certificate signed by the configured client CA "
                           "(--validate-client-ca); this endpoint is for the Kubernetes API server", "code": 403}


def test_only_the_api_server_may_call_validate_when_a_client_ca_is_set(
        cluster: Cluster, core: Any, gate: gate_mod.Gate, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if cluster.webhook_client_ca is None:
        pytest.skip("needs the control plane these tests start (its AdmissionConfiguration)")
    with solo_gate(cluster, core, request.config, tmp_path / "webhook", release="e2e-client-ca",
                   policy=gate_mod.DIGEST_ONLY_POLICY, session_gate=gate,
                   extra=["--validate-client-ca", str(cluster.webhook_client_ca),
                          "--validate-client-name", "kube-apiserver"]) as solo:
        # The API server's calls are judged (solo.namespace waits until this gate's decisions appear) …
        namespace = solo.namespace("e2e-client-ca")
        with pytest.raises(ApiException) as denied:
            core.create_namespaced_pod(namespace, manifests.pod("tagged", namespace, {"api": manifests.TAGGED}))
        assert json.loads(str(denied.value.body))["message"] == (
            'admission webhook "validate.promotion-gate.io" denied the request: [mutable-tag] Pod '
            f'{namespace}/tagged spec.containers[0] "api": image "{manifests.TAGGED}" is a mutable tag; '
            "deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>")
        core.create_namespaced_pod(namespace, manifests.pod("pinned", namespace, {"api": manifests.PINNED}))
        server = solo.server

        # … while anyone else who reaches the port, with a forged review, is refused and leaves no decision.
        forged = review(workload("Pod", ["api:1.4"], name="forged", namespace=namespace))
        reply = server.post("/validate", json=forged)
        assert reply.status_code == 403
        assert reply.json() == NO_CERTIFICATE
        assert server.decisions(forged["request"]["uid"]) == []

        # A certificate from another CA fails the handshake (TLS 1.3: the server's alert closes the connection).
        other_ca, other_key = certs.new_ca("someone else's CA")
        cert, key = certs.issue(other_ca, other_key, (), client=True, common_name="kube-apiserver")
        (tmp_path / "other.crt").write_bytes(cert)
        (tmp_path / "other.key").write_bytes(key)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(server.url + "/validate", json=forged, verify=str(server.ca), timeout=10,
                          cert=(str(tmp_path / "other.crt"), str(tmp_path / "other.key")))
        assert server.decisions(forged["request"]["uid"]) == []

        # Probes and metrics need no certificate.
        assert server.get("/healthz").json() == {"status": "ok"}
        assert server.get("/metrics").status_code == 200


def _namespace_lookups(cluster: Cluster) -> float:
    """kube-apiserver's count of namespace GETs answered 404 (its own metrics, read as the admin)."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="namespaces"' in line \
                and 'verb="GET"' in line and 'code="404"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_made_up_namespaces_cost_the_api_server_almost_nothing(cluster: Cluster, tmp_path: Path) -> None:
    server = start_webhook(cluster, tmp_path / "webhook")
    try:
        before = _namespace_lookups(cluster)
        started = time.monotonic()
        for i in range(300):
            body = review(workload("Pod", ["api:1.4"], namespace=f"made-up-{i}"))
            assert server.post("/validate", json=body).status_code == 200
        elapsed = time.monotonic() - started
        distinct = _namespace_lookups(cluster) - before
        # A miss may be looked up (a namespace created a moment ago), within a budget: 20 at once, 5 a second.
        assert distinct <= 20 + 5 * elapsed + 1, f"{distinct:.0f} lookups for 300 made-up namespaces"

        for _ in range(100):  # the same unknown name again and again: "not found" is remembered
            server.post("/validate", json=review(workload("Pod", ["api:1.4"], namespace="made-up-0")))
        for name in ("Not-A-Name", "x" * 64, "a_b", "dots.are.not.allowed"):  # cannot exist: never asked
            server.post("/validate", json=review(workload("Pod", ["api:1.4"], namespace=name)))
        assert _namespace_lookups(cluster) - before == distinct
        print(f"\n[hostile-callers] namespace GETs: {distinct:.0f} for 300 made-up names in {elapsed:.1f}s, "
              "0 for 100 repeats and 4 impossible names")
    finally:
        server.stop()


def test_a_namespace_created_after_it_was_looked_up_is_found(cluster: Cluster, core: Any, tmp_path: Path) -> None:
    # "Not found" is remembered, but never over the namespace watch: once it exists, it is judged as labelled.
    server = start_webhook(cluster, tmp_path / "webhook")
    try:
        name = gate_mod.unique_name("e2e-later")
        before = review(workload("Pod", ["api:1.4"], namespace=name))
        server.post("/validate", json=before)
        assert server.decisions(before["request"]["uid"])[0]["environment"] is None
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"promotion-gate.io/environment": "staging"}}})

        def judged_as_staging() -> bool | None:
            body = review(workload("Pod", ["api:1.4"], namespace=name))
            server.post("/validate", json=body)
            return True if server.decisions(body["request"]["uid"])[0]["environment"] == "staging" else None

        gate_mod.eventually(judged_as_staging, timeout=30, what=f"namespace {name} to be judged as staging")
    finally:
        server.stop()
