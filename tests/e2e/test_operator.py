"""``promotion-gate operator`` as a process against a real kube-apiserver, with the chart's Promotion CRD.

Promotion objects become records in a real store (a SQLite file the test reads too); the webhook's
certificate Secret and ``caBundle`` are created and kept in sync in a namespace of the test's own.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes.client.exceptions import ApiException

from tests.audit_tamper import attacker_on
from tests.e2e import gate as gate_mod
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import register_logs, unregister_logs
from tools.promotion_kit import DIGEST, IMAGE, REPOSITORY, Kit, cli, make_kit
from tools.servers import REPO
from webhook.store import SqlStore, open_store
from webhook.store.audit_format import Sealer, prepare

pytestmark = pytest.mark.e2e

CRD = REPO / "charts" / "promotion-gate" / "crds" / "promotion.yaml"
OPERATOR_COMMAND = [sys.executable, "-m", "webhook.cli", "operator"]
GROUP, VERSION, PLURAL = "promotion-gate.io", "v1", "promotions"
TLS_SECRET = "promotion-gate-tls"
SERVICE = "promotion-gate"
OTHER_DIGEST = "sha256:" + "c" * 64
EVIDENCE = {"gitCommit": "4f2c9e1", "gitRepository": "github.com/acme/payment-api", "ciRunId": "run-8812",
            "testsPassed": 120, "testsFailed": 0, "scan": {"scanner": "trivy", "critical": 0, "high": 0},
            "reason": "build 8812"}


@pytest.fixture(scope="module")
def promotion_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "customresourcedefinition/promotions.promotion-gate.io",
                    "--timeout=60s")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("operator-kit"))


@pytest.fixture
def custom(api_client: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


@pytest.fixture
def admission(api_client: Any) -> Any:
    from kubernetes import client

    return client.AdmissionregistrationV1Api(api_client)


@pytest.fixture
def webhook_configuration(admission: Any, namespace: str) -> Iterator[str]:
    """A ValidatingWebhookConfiguration with two webhooks that intercept nothing: only its caBundle matters."""
    name = gate_mod.unique_name("e2e-operator")
    inert = {"apiGroups": ["e2e.promotion-gate.io"], "apiVersions": ["v1"], "operations": ["CREATE"],
             "resources": ["nothing"], "scope": "Namespaced"}
    admission.create_validating_webhook_configuration({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": f"{hook}.promotion-gate.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Ignore", "rules": [inert],
                      "clientConfig": {"service": {"name": SERVICE, "namespace": namespace, "path": "/validate"}}}
                     for hook in ("validate", "second")],
    })
    yield name
    admission.delete_validating_webhook_configuration(name)


@dataclass
class Operator:
    cluster: Cluster
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*OPERATOR_COMMAND, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=REPO, env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)})

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the operator did not stop on SIGTERM:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log()}")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def operator(cluster: Cluster, promotion_crd: None, kit: Kit, namespace: str, webhook_configuration: str,
             store_path: Path, tmp_path: Path, pytestconfig: pytest.Config) -> Iterator[Operator]:
    running = Operator(cluster, [
        "--standalone", "--store", f"sqlite:///{store_path}", "--policy", str(kit.policy_path),
        "--key", str(kit.key("ci")), "--namespace-scope", namespace, "--namespace", namespace,
        "--manage-certificates", "--tls-secret", TLS_SECRET, "--service", SERVICE,
        "--webhook-config", webhook_configuration, "--certificate-check-interval", "1",
    ], tmp_path / "operator.log")
    register_logs(pytestconfig, {"operator": running.log_path})
    running.start()
    try:
        yield running
    finally:
        running.stop()
        unregister_logs(pytestconfig, ["operator"])


def promotion(name: str, environment: str, image: str = IMAGE, **evidence: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Promotion", "metadata": {"name": name},
            "spec": {"image": image, "environment": environment, "evidence": {**EVIDENCE, **evidence}}}


def settled(custom: Any, operator: Operator, namespace: str, name: str, phase: str,
            generation: int = 1) -> dict[str, Any]:
    """The Promotion's status once the operator wrote ``phase`` for ``generation``."""
    def attempt() -> dict[str, Any] | None:
        operator.check_alive()
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        if status.get("phase") == phase and status.get("observedGeneration") == generation:
            return dict(status)
        return None

    return gate_mod.eventually(attempt, timeout=60, interval=0.25, what=f"Promotion {name} to be {phase}")


def stored(store_path: Path, digest: str = DIGEST) -> list[tuple[str, str, str]]:
    store: SqlStore = open_store(f"sqlite:///{store_path}")
    try:
        return [(s.id, s.record.environment, s.record.by) for s in store.find_records(digest=digest)]
    finally:
        store.close()


def ca_bundles(admission: Any, name: str) -> list[bytes]:
    config = admission.read_validating_webhook_configuration(name)
    return [base64.b64decode(w.client_config.ca_bundle or "") for w in config.webhooks]


def test_promotions_become_records(operator: Operator, custom: Any, namespace: str, store_path: Path) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, promotion("api-ci", "ci"))
    status = settled(custom, operator, namespace, "api-ci", "Recorded")
    assert status["reason"] == f'{IMAGE} recorded for environment "ci"'
    assert stored(store_path) == [(status["recordId"], "ci", f"kubernetes:{namespace}/api-ci")]

    # Skipping ci is refused with the store's words; fixing the chain and editing the object records it.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           promotion("other-staging", "staging", f"{REPOSITORY}@{OTHER_DIGEST}"))
    rejected = settled(custom, operator, namespace, "other-staging", "Rejected")
    assert rejected["reason"] == (f'rule requirePrevious: {REPOSITORY}@{OTHER_DIGEST} has no valid record in "ci"; '
                                  'promote it to "ci" first (no skipping)')
    assert "recordId" not in rejected
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           promotion("other-ci", "ci", f"{REPOSITORY}@{OTHER_DIGEST}"))
    settled(custom, operator, namespace, "other-ci", "Recorded")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "other-staging",
                                          {"spec": {"evidence": {"reason": "ci recorded now"}}})
    settled(custom, operator, namespace, "other-staging", "Recorded", generation=2)
    assert [env for _, env, _ in stored(store_path, OTHER_DIGEST)] == ["ci", "staging"]

    # Production needs two signatures: the operator's key alone is never enough.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           promotion("other-production", "production", f"{REPOSITORY}@{OTHER_DIGEST}"))
    refused = settled(custom, operator, namespace, "other-production", "Rejected")
    assert refused["reason"].startswith('rule signatures: environment "production" requires 2 signature(s) from '
                                        "distinct trusted keys, found 0")


def test_a_restart_finds_the_same_record_and_deletion_keeps_it(operator: Operator, custom: Any, namespace: str,
                                                               store_path: Path) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, promotion("api-ci", "ci"))
    first = settled(custom, operator, namespace, "api-ci", "Recorded")
    assert operator.stop() == 0, operator.log()

    # As if the operator had stored the record and died before writing status.
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "api-ci", {
        "status": {"phase": None, "reason": None, "recordId": None, "observedGeneration": None}})
    operator.start()
    again = settled(custom, operator, namespace, "api-ci", "Recorded")
    assert again["recordId"] == first["recordId"]
    assert again["reason"] == f'{IMAGE} was already recorded for environment "ci"'
    assert [record_id for record_id, _, _ in stored(store_path)] == [first["recordId"]]

    # No finalizer: the object goes at once, and its record stays (revocation is explicit).
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "api-ci")

    def gone() -> bool | None:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "api-ci")
        except ApiException as exc:
            return True if exc.status == 404 else None
        return None

    gate_mod.eventually(gone, timeout=30, what="the Promotion to be deleted")
    assert [record_id for record_id, _, _ in stored(store_path)] == [first["recordId"]]


def test_the_webhook_certificate_is_created_and_its_ca_bundle_kept(operator: Operator, core: Any, admission: Any,
                                                                  namespace: str, webhook_configuration: str) -> None:
    def secret() -> Any:
        operator.check_alive()
        try:
            return core.read_namespaced_secret(TLS_SECRET, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    created = gate_mod.eventually(secret, timeout=60, interval=0.25, what=f"Secret {TLS_SECRET}")
    assert created.type == "kubernetes.io/tls"
    assert sorted(created.data) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    ca = base64.b64decode(created.data["ca.crt"])

    def in_sync() -> bool | None:
        operator.check_alive()
        return True if ca_bundles(admission, webhook_configuration) == [ca, ca] else None

    gate_mod.eventually(in_sync, timeout=30, what="caBundle of both webhooks to be ca.crt")

    # Someone (a GitOps sync, a helm upgrade) overwrites one caBundle: the next check restores it.
    config = admission.read_validating_webhook_configuration(webhook_configuration)
    config.webhooks[1].client_config.ca_bundle = base64.b64encode(b"stale").decode()
    admission.replace_validating_webhook_configuration(webhook_configuration, config)
    gate_mod.eventually(in_sync, timeout=30, what="the drifted caBundle to be restored")
    # A valid certificate is kept: the Secret was written once.
    assert secret().metadata.resource_version == created.metadata.resource_version
    serving = x509.load_pem_x509_certificate(base64.b64decode(created.data["tls.crt"]))
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [f"{SERVICE}.{namespace}.svc",
                                                       f"{SERVICE}.{namespace}.svc.cluster.local"]


ANCHOR = "promotion-gate-audit-anchor"


def test_the_audit_anchor_follows_the_log_and_keeps_what_exposes_a_truncation(
        cluster: Cluster, promotion_crd: None, kit: Kit, namespace: str, core: Any, store_path: Path, tmp_path: Path,
        pytestconfig: pytest.Config) -> None:
    document = yaml.safe_load(kit.policy_path.read_text())
    document["audit"] = {**document.get("audit", {}), "checkpointKeys": ["release"]}
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(document))
    url = f"sqlite:///{store_path}"
    store = open_store(url, migrate=True)
    sealer = Sealer(kit.signing_key("release"), 5, 3600)

    def decide(count: int) -> None:
        for _ in range(count):
            event = {"time": "2026-11-25T10:00:00.000000Z", "uid": str(uuid.uuid4()), "user": "dev@example.com",
                     "namespace": "payments-ci", "allowed": False, "reasons": ["mutable-tag"], "images": []}
            store.append_audit([prepare(event)], sealer)

    decide(7)  # checkpoints at events 1 and 6
    running = Operator(cluster, ["--standalone", "--store", url, "--policy", str(policy_path), "--namespace-scope",
                                 namespace, "--namespace", namespace, "--audit-anchor", ANCHOR,
                                 "--audit-anchor-interval", "1"], tmp_path / "operator-anchor.log")
    register_logs(pytestconfig, {"operator-anchor": running.log_path})
    running.start()

    def anchored(seq: int) -> dict[str, str] | None:
        running.check_alive()
        try:
            data = dict(core.read_namespaced_config_map(ANCHOR, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return data if json.loads(data["checkpoint.json"])["checkpoint"] == seq else None

    try:
        first = gate_mod.eventually(lambda: anchored(2), timeout=60, interval=0.25, what="the anchor at checkpoint 2")
        head = store.checkpoint_head()
        assert head is not None and json.loads(first["checkpoint.json"]) == head.to_json()
        assert first["status"] == f"anchored checkpoint 2 (event 6, {head.created_at})"
        decide(5)  # checkpoint 3 at event 11: the anchor follows
        newest = gate_mod.eventually(lambda: anchored(3), timeout=30, interval=0.25, what="the anchor at checkpoint 3")

        # Someone with the database deletes the newest events together with their checkpoints.
        attacker_on(url).sql("DELETE FROM audit_checkpoint_chain WHERE seq >= 2",
                             "DELETE FROM audit_events WHERE seq > 3")
        checkpoint = json.loads(newest["checkpoint.json"])
        problem = (f"signed checkpoint 3 (event 11, {checkpoint['time']}) of the anchor is not in the log: the log "
                   "was truncated or emptied after the anchor was taken")

        def alarmed() -> dict[str, str] | None:
            data = anchored(3)
            return data if data is not None and data["status"] == f"TAMPERED: {problem}" else None

        kept = gate_mod.eventually(alarmed, timeout=30, interval=0.25, what="the anchor to raise the alarm")
        assert kept["checkpoint.json"] == newest["checkpoint.json"]  # the anchor that exposes it stays
        assert f"audit log TAMPERED: {problem}; the anchor in ConfigMap {namespace}/{ANCHOR} was kept" in running.log()
        events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={ANCHOR}").items
        assert [(e.type, e.reason, e.message) for e in events] == [
            ("Warning", "AuditLogTampered", f"audit log TAMPERED: {problem}")]
        decide(3)  # the server goes on writing: still the old anchor, still the alarm
        time.sleep(2.5)
        assert alarmed() == kept

        configmap = cluster.kubectl("get", "configmap", ANCHOR, "-n", namespace, "-o", "json").stdout
        verified = cli("audit", "verify", "--store", url, "--key", str(kit.key("release")) + ".pub", "--anchor", "-",
                       stdin=configmap)
        assert (verified.returncode, verified.stdout) == (1, f"audit log TAMPERED: {problem}\n")
    finally:
        running.stop()
        unregister_logs(pytestconfig, ["operator-anchor"])
        store.close()
