"""Failure modes a cluster operator relies on: a slow store, a rotated certificate."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from pathlib import Path

import pytest
import yaml

from tools.promotion_kit import IMAGE, cli, make_kit, policy_document
from tools.reviews import review, workload
from tools.servers import PostgresServer, RunningServer
from webhook import certs


def remote(gate: RunningServer, kit, identity: str) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--server", gate.url, "--token-file", str(kit.token_file(identity)), "--ca-file", str(gate.ca)]


def test_slow_store_fails_closed_unless_a_fresh_verdict_is_cached(server_factory, postgres: PostgresServer,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path) -> None:
    import psycopg

    kit = make_kit(tmp_path / "kit")
    document = policy_document(kit.root, extra={"store": {"timeoutSeconds": 0.5, "cacheSeconds": 300}})
    kit.policy_path.write_text(yaml.safe_dump(document))
    url = postgres.create_database("slow_store")
    gate = server_factory(policy=kit.policy_path.read_text(), store=url)
    assert cli("record", IMAGE, "--no-registry", "--env", "ci", "--git-commit", "c", "--ci-run", "1", "--tests-passed", "1",
               "--tests-failed", "0", "--scan-critical", "0", "--scan-high", "0", "--key", str(kit.key("ci")),
               *remote(gate, kit, "ci-bot")).returncode == 0

    def admit(namespace: str) -> dict:  # type: ignore[type-arg]
        body = review(workload("Pod", [IMAGE], name="api", namespace=namespace))
        return gate.post("/validate", json=body).json()["response"]  # type: ignore[no-any-return]

    assert admit("payments-ci")["allowed"] is True  # evaluated from the records ...
    assert admit("payments-ci")["allowed"] is True  # ... and reused: no record was added since
    counts = gate.get("/metrics").text
    assert 'promotion_gate_verdict_cache_total{result="miss"} 1.0' in counts
    assert 'promotion_gate_verdict_cache_total{result="hit"} 1.0' in counts
    with psycopg.connect(url) as blocker:  # a real lock: every read of records now waits
        blocker.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        cached = admit("payments-ci")
        uncached = admit("payments-staging")
        tag = gate.post("/validate", json=review(workload("Pod", ["ghcr.io/acme/payment-api:1.4"], name="api",
                                                          namespace="payments-ci"))).json()["response"]
        elapsed = time.monotonic() - started
        blocker.rollback()
    # The promoted digest of a tag is a hint: without the store, the plain denial stands, within the deadline.
    assert tag["status"]["message"] == (
        '[mutable-tag] Pod payments-ci/api spec.containers[0] "c0": image "ghcr.io/acme/payment-api:1.4" is a mutable '
        "tag; deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>")
    assert cached["allowed"] is True
    assert uncached["allowed"] is False
    assert uncached["status"]["message"] == (
        f'[store-unavailable] Pod payments-staging/api spec.containers[0] "c0": {IMAGE}: the attestation store did '
        "not answer (timed out); retry, or ask the cluster operator")
    assert elapsed < 5  # answered within the deadline, well under the webhook timeout
    metrics = gate.get("/metrics").text
    assert 'promotion_gate_verdict_cache_total{result="stale-served"} 1.0' in metrics
    assert 'promotion_gate_store_errors_total{operation="lookup"} 3.0' in metrics


def _serving_ca(server: RunningServer, cafile: Path) -> bool:
    context = ssl.create_default_context(cafile=str(cafile))
    host, port = server.url.removeprefix("https://").split(":")
    try:
        with context.wrap_socket(__import__("socket").create_connection((host, int(port)), timeout=5),
                                 server_hostname=host):
            return True
    except ssl.SSLError:
        return False


def test_renewed_certificate_is_served_without_dropping_requests(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert_dir = tmp_path / "certs"
    gate = server_factory(policy="apiVersion: promotion-gate.io/v1\nkind: Policy\nnamespaces: {unmapped: digest-only}\n",
                          cert_dir=cert_dir)
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes((cert_dir / "ca.crt").read_bytes())
    body = json.dumps(review(workload("Pod", [IMAGE], namespace="team"))).encode()

    # a keep-alive client that keeps asking while the certificate is rotated under it
    context = ssl.create_default_context(cafile=str(old_ca))
    host, port = gate.url.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def keep_asking() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                connection.request("POST", "/validate", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                if json.loads(response.read())["response"]["allowed"] is not True:
                    failures.append("denied")
                answered += 1
            except Exception as exc:  # any dropped request fails the test
                failures.append(repr(exc))
                return

    worker = threading.Thread(target=keep_asking)
    worker.start()
    time.sleep(0.5)
    certs.ensure_dev_certificates(cert_dir, force=True)  # new CA and serving certificate, atomic renames
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _serving_ca(gate, cert_dir / "ca.crt"):
        time.sleep(0.2)
    stop.set()
    worker.join()
    assert _serving_ca(gate, cert_dir / "ca.crt"), "new connections should get the renewed certificate"
    assert not _serving_ca(gate, old_ca)
    assert failures == []
    assert answered > 10


@pytest.mark.parametrize("garbage", [b"", b"-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n"])
def test_broken_renewal_keeps_the_previous_certificate(server_factory, tmp_path: Path, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    cert_dir = tmp_path / "certs"
    gate = server_factory(policy="apiVersion: promotion-gate.io/v1\nkind: Policy\n", cert_dir=cert_dir)
    (cert_dir / "tls.crt").write_bytes(garbage)
    time.sleep(1.5)
    assert _serving_ca(gate, cert_dir / "ca.crt")
    assert gate.get("/healthz").status_code == 200
