"""Faults an operator will meet: a webhook Pod killed, both replicas gone, a certificate rotation, the
store's database restarted. Admission requests are server-side dry-run creates: the API server calls
the webhook exactly as for a real create (``sideEffects: None``), and nothing piles up on the node."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cluster import kit
from tests.cluster.conftest import AppImage, ClusterUnderTest, Release

WEBHOOK_PODS = "app.kubernetes.io/component=webhook"


@dataclass
class Outcome:
    expected_allowed: bool
    allowed: bool
    message: str
    seconds: float


@dataclass
class Stream:
    outcomes: list[Outcome] = field(default_factory=list)

    def wrong(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.allowed != o.expected_allowed]


@pytest.fixture(scope="module")
def core(cluster: ClusterUnderTest) -> Iterator[Any]:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(cluster.node.kubeconfig))  # type: ignore[no-untyped-call]
    yield client.CoreV1Api(api)
    api.close()


@pytest.fixture(scope="module")
def promoted(release: Release, app_image: Callable[[str], AppImage]) -> AppImage:
    image = app_image("faults")
    release.store.promoted(image.reference, image.git_commit, image.ci_run)
    return image


def create(core: Any, namespace: str, image: str, expected_allowed: bool) -> Outcome:
    """One server-side dry-run create of a Pod; what the API server answered."""
    from kubernetes.client.exceptions import ApiException

    started = time.monotonic()
    body = kit.pod(f"p-{uuid.uuid4().hex[:8]}", namespace, image)
    try:
        core.create_namespaced_pod(namespace, body, dry_run="All", _request_timeout=30)
        return Outcome(expected_allowed, True, "", time.monotonic() - started)
    except ApiException as exc:
        return Outcome(expected_allowed, False, str(exc.body), time.monotonic() - started)


@contextmanager
def background_stream(core: Any, namespace: str, image: str, *, interval: float = 0.2) -> Iterator[Stream]:
    """Admission requests for ``image`` (expected allowed) every ``interval`` seconds until the block ends."""
    stream = Stream()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            stream.outcomes.append(create(core, namespace, image, True))
            stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield stream
    finally:
        stop.set()
        thread.join(timeout=60)


def ready_webhook_pods(kube: kit.Kube, release: Release) -> list[dict[str, Any]]:
    return [p for p in kube.pods(release.namespace, WEBHOOK_PODS)
            if not p["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def test_killing_one_webhook_pod_during_100_creates_gets_no_verdict_wrong(
        release: Release, kube: kit.Kube, core: Any, promoted: AppImage) -> None:
    namespace = kube.namespace("stream-staging", "staging")
    victim = ready_webhook_pods(kube, release)[0]["metadata"]["name"]
    stream = Stream()
    for i in range(100):
        if i == 20:
            # What a node drain, an eviction or `kubectl delete pod` does: SIGTERM, then the grace period.
            kube.kubectl("delete", "pod", victim, "-n", release.namespace, "--wait=false")
        if i % 2 == 0:
            stream.outcomes.append(create(core, namespace, promoted.reference, True))
        else:
            stream.outcomes.append(create(core, namespace, promoted.tag(), False))
        time.sleep(0.15)
    wrong = stream.wrong()
    assert not wrong, f"{len(wrong)} of 100 wrong verdicts, e.g. {wrong[0]}"
    refused = [o for o in stream.outcomes if not o.allowed]
    assert all("[mutable-tag]" in o.message for o in refused), refused[0]
    assert victim not in {p["metadata"]["name"] for p in kube.pods(release.namespace, WEBHOOK_PODS)}
    kit.wait_for("two ready webhook Pods again", lambda: len(ready_webhook_pods(kube, release)) == 2, timeout=120)


def test_with_both_replicas_down_failure_policy_fail_refuses_then_recovers(
        release: Release, kube: kit.Kube, core: Any, promoted: AppImage) -> None:
    namespace = kube.namespace("outage-staging", "staging")
    kube.kubectl("scale", "deployment/promotion-gate", "-n", release.namespace, "--replicas=0")
    try:
        kit.wait_for("no webhook Pods", lambda: not kube.pods(release.namespace, WEBHOOK_PODS), timeout=120)
        result = kube.apply([kit.pod("api", namespace, promoted.reference)])
        assert result.returncode != 0
        assert result.stderr == (
            f'Error from server (InternalError): error when creating "{result.path}": Internal error occurred: '
            f'failed calling webhook "{kit.WEBHOOK}": failed to call webhook: Post '
            f'"https://promotion-gate.{release.namespace}.svc:443/validate?timeout=10s": '
            'no endpoints available for service "promotion-gate"\n')
    finally:
        kube.kubectl("scale", "deployment/promotion-gate", "-n", release.namespace, "--replicas=2")
    kit.wait_for("two ready webhook Pods", lambda: len(ready_webhook_pods(kube, release)) == 2, timeout=180)
    kit.wait_for("the promoted digest to be admitted again",
                 lambda: create(core, namespace, promoted.reference, True).allowed, timeout=60)


def near_expiry_certificate(secret: dict[str, Any], service_names: list[str]) -> tuple[bytes, bytes]:
    """A serving certificate from the same CA with 10 of 90 days left: the operator must renew it."""
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca_cert = x509.load_pem_x509_certificate(data["ca.crt"])
    ca_key = serialization.load_pem_private_key(data["ca.key"], password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=80)).not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in service_names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def served_certificate(pod_ip: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    import socket

    with socket.create_connection((pod_ip, 8443), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_the_operator_rotates_the_serving_certificate_without_a_failed_admission(
        release: Release, kube: kit.Kube, core: Any, promoted: AppImage) -> None:
    namespace = kube.namespace("rotation-staging", "staging")
    secret_name = "promotion-gate-tls"
    secret = kube.json("get", "secret", secret_name, "-n", release.namespace)
    ca_bundle = kube.json("get", "validatingwebhookconfiguration", release.name)["webhooks"][0]["clientConfig"]["caBundle"]
    names = [f"promotion-gate.{release.namespace}.svc", f"promotion-gate.{release.namespace}.svc.cluster.local"]
    expiring_cert, expiring_key = near_expiry_certificate(secret, names)

    def fingerprint(pem_or_der: bytes) -> str:
        der = (x509.load_pem_x509_certificate(pem_or_der).public_bytes(serialization.Encoding.DER)
               if pem_or_der.startswith(b"-----") else pem_or_der)
        return hashlib.sha256(der).hexdigest()

    with background_stream(core, namespace, promoted.reference) as stream:
        time.sleep(2)
        patch = json.dumps({"data": {"tls.crt": base64.b64encode(expiring_cert).decode(),
                                     "tls.key": base64.b64encode(expiring_key).decode()}})
        kube.kubectl("patch", "secret", secret_name, "-n", release.namespace, "--type=merge", "-p", patch)

        def renewed() -> bytes | None:
            current = kube.json("get", "secret", secret_name, "-n", release.namespace)["data"]
            cert_pem = base64.b64decode(current["tls.crt"])
            if fingerprint(cert_pem) == fingerprint(expiring_cert):
                return None
            cert = x509.load_pem_x509_certificate(cert_pem)
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            return cert_pem if left > datetime.timedelta(days=60) else None

        new_cert = kit.wait_for("the operator to renew the near-expiry serving certificate", renewed, timeout=120)

        def serving_new() -> bool:
            ips = [p["status"]["podIP"] for p in ready_webhook_pods(kube, release)]
            return len(ips) == 2 and all(fingerprint(served_certificate(ip)) == fingerprint(new_cert) for ip in ips)

        # The kubelet delivers the updated Secret into the Pods; the server reloads without a restart.
        kit.wait_for("both webhook Pods to serve the renewed certificate", serving_new, timeout=180, interval=2)
        time.sleep(2)
    assert len(stream.outcomes) > 20
    failed = stream.wrong()
    assert not failed, f"{len(failed)} of {len(stream.outcomes)} admissions failed during rotation: {failed[0]}"
    after = kube.json("get", "validatingwebhookconfiguration", release.name)["webhooks"][0]["clientConfig"]["caBundle"]
    assert after == ca_bundle, "a renewal keeps the CA"
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in ready_webhook_pods(kube, release))


def test_a_store_restart_refuses_with_store_unavailable_in_time_then_recovers(
        release: Release, kube: kit.Kube, core: Any, cluster: ClusterUnderTest,
        app_image: Callable[[str], AppImage]) -> None:
    image = app_image("store-restart")  # never judged before: no cached verdict can stand in
    release.store.promoted(image.reference, image.git_commit, image.ci_run)
    namespace = kube.namespace("store-staging", "staging")
    cluster.node.stop_postgres()
    try:
        outcome = create(core, namespace, image.reference, False)
        assert not outcome.allowed
        assert "[store-unavailable]" in outcome.message, outcome.message
        # Inside the deadline: the policy's store.timeoutSeconds (2 s), well under the webhook's 10 s.
        assert outcome.seconds < 8, f"answered after {outcome.seconds:.1f}s"
    finally:
        cluster.node.start_postgres_again()
    recovered_at = time.monotonic()
    kit.wait_for("admission to recover after the database restart",
                 lambda: create(core, namespace, image.reference, True).allowed, timeout=90)
    assert time.monotonic() - recovered_at < 90
