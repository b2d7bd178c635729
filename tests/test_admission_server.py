"""The admission webhook as the API server sees it: a real server process, real TLS, real payloads."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import DIGEST_ONLY_POLICY
from tools.reviews import DIGEST, POD_SPEC_PATH, review, workload
from tools.servers import RunningServer

KINDS = sorted(POD_SPEC_PATH)


def spec_prefix(kind: str) -> str:
    return ".".join(POD_SPEC_PATH[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_mutable_tag_is_denied_for_every_workload_kind(digest_only_server: RunningServer, kind: str) -> None:
    body = review(workload(kind, ["ghcr.io/acme/payment-api:1.4"], name="payment-api", namespace="payments"))
    reply = digest_only_server.post("/validate", json=body)
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 403
    assert answer["response"]["status"]["message"] == (
        f'[mutable-tag] {kind} payments/payment-api {spec_prefix(kind)}.containers[0] "c0": image '
        '"ghcr.io/acme/payment-api:1.4" is a mutable tag; deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>'
    )
    assert "patch" not in answer["response"] and "patchType" not in answer["response"]


@pytest.mark.parametrize("kind", KINDS)
def test_digest_is_allowed_for_every_workload_kind(digest_only_server: RunningServer, kind: str) -> None:
    body = review(workload(kind, [f"ghcr.io/acme/payment-api@{DIGEST}"]))
    answer = digest_only_server.post("/validate", json=body).json()
    assert answer["response"] == {"uid": body["request"]["uid"], "allowed": True}


def test_every_finding_is_reported_in_one_denial(digest_only_server: RunningServer) -> None:
    obj = workload("Deployment", {
        "initContainers": ["busybox"],
        "containers": [f"api@{DIGEST}", "Api:1", "sidecar:2"],
    }, name="shop", namespace="web")
    message = digest_only_server.post("/validate", json=review(obj)).json()["response"]["status"]["message"]
    assert message.splitlines() == [
        '[mutable-tag] Deployment web/shop spec.template.spec.initContainers[0] "c0": image "busybox" is a mutable '
        'tag (no tag: implicitly "latest"); deploy by digest: busybox@sha256:<digest>',
        '[invalid-reference] Deployment web/shop spec.template.spec.containers[1] "c1": image "Api:1" is not a valid '
        "reference: repository name must be lowercase",
        '[mutable-tag] Deployment web/shop spec.template.spec.containers[2] "c2": image "sidecar:2" is a mutable tag; '
        "deploy by digest: sidecar@sha256:<digest>",
    ]


def test_tag_with_digest_is_allowed_with_a_warning(digest_only_server: RunningServer) -> None:
    body = review(workload("Pod", [f"nginx:1.25@{DIGEST}"]))
    response = digest_only_server.post("/validate", json=body).json()["response"]
    assert response["allowed"] is True
    assert response["warnings"] == ['spec.containers[0] "c0": tag "1.25" is ignored, the digest is pulled']
    assert all(len(w) <= 120 for w in response["warnings"])


def test_ephemeral_container_added_by_kubectl_debug_is_judged(digest_only_server: RunningServer) -> None:
    old = workload("Pod", [f"api@{DIGEST}"], name="api-7d9", namespace="payments")
    new = json.loads(json.dumps(old))
    new["spec"]["ephemeralContainers"] = [{"name": "debugger-x", "image": "busybox:1.36"}]
    body = review(new, old=old, operation="UPDATE", sub_resource="ephemeralcontainers")
    response = digest_only_server.post("/validate", json=body).json()["response"]
    assert response["allowed"] is False
    assert response["status"]["message"] == (
        '[mutable-tag] Pod payments/api-7d9 spec.ephemeralContainers[0] "debugger-x": image "busybox:1.36" is a '
        "mutable tag; deploy by digest: busybox@sha256:<digest>"
    )


# Requests that must keep working whatever images the object has.
def _scaled(obj: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(obj))
    copy["spec"]["replicas"] = 0
    copy["metadata"]["labels"] = {"new": "label"}
    return copy


TAGGED = workload("Deployment", ["api:1.4"], name="legacy")
DELETING = json.loads(json.dumps(TAGGED))
DELETING["metadata"]["deletionTimestamp"] = "2026-11-25T10:00:00Z"
DELETING["metadata"]["finalizers"] = []

NEVER_BLOCKED = {
    "delete": review(None, old=TAGGED, operation="DELETE"),
    "connect": review(None, operation="CONNECT", kind="Pod", namespace="team-a"),
    "scale-down and labels": review(_scaled(TAGGED), old=TAGGED, operation="UPDATE"),
    "finalizer removal while deleting": review(DELETING, old=DELETING, operation="UPDATE"),
    "not a workload": review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, kind="ConfigMap"),
    "kube-system is exempt": review(workload("Pod", ["pause:3.9"], namespace="kube-system")),
}


@pytest.mark.parametrize("body", NEVER_BLOCKED.values(), ids=NEVER_BLOCKED.keys())
def test_requests_that_must_never_be_blocked(digest_only_server: RunningServer, body: dict) -> None:  # type: ignore[type-arg]
    response = digest_only_server.post("/validate", json=body).json()["response"]
    assert response["allowed"] is True, response


def test_update_that_introduces_a_tag_is_denied(digest_only_server: RunningServer) -> None:
    pinned = workload("Deployment", [f"api@{DIGEST}"], name="api")
    body = review(workload("Deployment", ["api:1.5"], name="api"), old=pinned, operation="UPDATE")
    assert digest_only_server.post("/validate", json=body).json()["response"]["allowed"] is False


def test_dry_run_is_judged_the_same_way(digest_only_server: RunningServer) -> None:
    body = review(workload("Pod", ["api:1.4"]), dry_run=True)
    assert digest_only_server.post("/validate", json=body).json()["response"]["allowed"] is False


MALFORMED = {
    "not json": (b"{not json", 400, "body is not valid JSON"),
    "json array": (b"[]", 400, "malformed AdmissionReview: body must be a JSON object (an AdmissionReview)"),
    "wrong apiVersion": (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                                     "request": {"uid": "1"}}).encode(), 400,
                         "malformed AdmissionReview: expected apiVersion 'admission.k8s.io/v1' and kind "
                         "'AdmissionReview', got 'admission.k8s.io/v1beta1' and 'AdmissionReview'"),
    "no request": (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), 400,
                   "malformed AdmissionReview: request is required and must be an object"),
    "no uid": (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "request": {"operation": "CREATE"}}).encode(), 400,
               "malformed AdmissionReview: request.uid is required"),
    "uid not a string": (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                     "request": {"uid": 7}}).encode(), 400,
                         "malformed AdmissionReview: request.uid must be a string"),
    "bad operation": (json.dumps(review(workload("Pod", ["a"]), uid="u") | {}).replace('"CREATE"', '"PATCH"').encode(),
                      400, "malformed AdmissionReview: request.operation must be one of CREATE, UPDATE, DELETE, CONNECT"),
    "containers not a list": (json.dumps(review({"kind": "Pod", "metadata": {"name": "p"},
                                                 "spec": {"containers": {"image": "x"}}}, kind="Pod")).encode(),
                              400, "malformed AdmissionReview: request.object: spec.containers must be a list"),
    "image not a string": (json.dumps(review({"kind": "Pod", "metadata": {"name": "p"},
                                              "spec": {"containers": [{"name": "a", "image": ["x"]}]}},
                                             kind="Pod")).encode(),
                           400, "malformed AdmissionReview: request.object: spec.containers[0].image must be a string"),
    "object not an object": (json.dumps(review(None, kind="Pod")).replace('"object": null', '"object": "x"').encode(),
                             400, "malformed AdmissionReview: request.object must be an object or null"),
    "create without an object": (json.dumps(review(None, kind="Pod")).encode(), 400,
                                 "malformed AdmissionReview: request.object is required for CREATE"),
    "update without an object": (json.dumps(review(None, old=workload("Pod", ["a:1"]), operation="UPDATE")).encode(),
                                 400, "malformed AdmissionReview: request.object is required for UPDATE"),
    "deeply nested": (b"[" * 100000 + b"]" * 100000, 400, "body is not valid JSON"),
    "invalid utf-8": (b'{"apiVersion": "\xff"}', 400, "body is not valid JSON"),
}


@pytest.mark.parametrize(("body", "status", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_gets_a_json_error(digest_only_server: RunningServer, body: bytes, status: int,
                                           message: str) -> None:
    reply = digest_only_server.post("/validate", data=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    assert reply.json() == {"error": message, "code": status}


def test_oversized_body_is_refused_with_413_before_it_is_read(digest_only_server: RunningServer) -> None:
    # The server answers from the Content-Length header alone, without reading 9 MiB first.
    context = ssl.create_default_context(cafile=str(digest_only_server.ca))
    host, port = digest_only_server.url.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=15)
    connection.putrequest("POST", "/validate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(9 * 1024 * 1024))
    connection.endheaders()
    connection.send(b"{" + b" " * 65536)
    reply = connection.getresponse()
    assert reply.status == 413
    assert json.loads(reply.read()) == {"error": "request body is larger than 8388608 bytes", "code": 413}
    connection.close()
    # the worker survived
    assert digest_only_server.get("/healthz").status_code == 200


def test_health_readiness_and_metrics(digest_only_server: RunningServer) -> None:
    assert digest_only_server.get("/healthz").json() == {"status": "ok"}
    assert digest_only_server.get("/readyz").json() == {"status": "ok", "detail": "ok"}
    digest_only_server.post("/validate", json=review(workload("Pod", ["metrics-probe:1"])))
    text = digest_only_server.get("/metrics").text
    assert 'promotion_gate_decisions_total{allowed="false",environment="",mode="enforce",reason="mutable-tag"}' in text
    assert "promotion_gate_admission_duration_seconds_bucket" in text


def test_one_json_log_line_per_decision(digest_only_server: RunningServer) -> None:
    body = review(workload("Pod", ["log-probe:1"], name="logged", namespace="audit-ns"), user="dev@example.com")
    digest_only_server.post("/validate", json=body)
    (event,) = digest_only_server.decisions(body["request"]["uid"])  # exactly one line
    assert {k: event[k] for k in ("uid", "user", "namespace", "kind", "name", "operation", "dryRun", "allowed",
                                  "reasons")} == {
        "uid": body["request"]["uid"], "user": "dev@example.com", "namespace": "audit-ns", "kind": "Pod",
        "name": "logged", "operation": "CREATE", "dryRun": False, "allowed": False, "reasons": ["mutable-tag"],
    }
    assert event["images"][0]["image"] == "log-probe:1"


def test_get_on_validate_is_405_json(digest_only_server: RunningServer) -> None:
    reply = digest_only_server.get("/validate")
    assert reply.status_code == 405
    assert reply.json()["code"] == 405


BREAK_GLASS_POLICY = """\
apiVersion: promotion-gate.io/v1
kind: Policy
namespaces:
  unmapped: digest-only
  environments: {payments: production}
environments:
  - name: production
breakGlass:
  users: [oncall@acme.example]
"""


def series(metrics_text: str, name: str) -> list[str]:
    return [line for line in metrics_text.splitlines() if line.startswith(name + "{")]


def test_made_up_namespaces_create_no_metric_series(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # 500 forged break-glass admissions, each in a namespace nobody created: one series, not 500.
    gate = server_factory(policy=BREAK_GLASS_POLICY, store=f"sqlite:///{tmp_path / 'store.db'}")
    for i in range(500):
        obj = workload("Pod", ["api:1.4"], namespace=f"made-up-{i}",
                       annotations={"promotion-gate.io/break-glass": "INC-1"})
        answer = gate.post("/validate", json=review(obj, user="oncall@acme.example")).json()
        assert answer["response"]["allowed"] is True
    obj = workload("Pod", ["api:1.4"], namespace="payments", annotations={"promotion-gate.io/break-glass": "INC-2"})
    gate.post("/validate", json=review(obj, user="oncall@acme.example"))
    text = gate.get("/metrics").text
    assert series(text, "promotion_gate_break_glass_total") == [
        'promotion_gate_break_glass_total{environment="",namespace=""} 500.0',
        'promotion_gate_break_glass_total{environment="production",namespace="payments"} 1.0',
    ]
    labelled = [line for line in text.splitlines() if line.startswith("promotion_gate_") and "{" in line]
    assert not [line for line in labelled if "made-up" in line]


def test_several_workers_answer_one_set_of_metrics(server_factory) -> None:  # type: ignore[no-untyped-def]
    """With --workers 2, /metrics is the pod's sum whichever worker a scrape reaches, and a worker
    that dies takes none of it away."""
    gate = server_factory(policy=DIGEST_ONLY_POLICY, extra=["--workers", "2"])
    body = review(workload("Pod", ["metrics-probe:1"]))
    with ThreadPoolExecutor(max_workers=8) as pool:  # each request on its own connection: both workers answer
        codes = list(pool.map(lambda _: gate.post("/validate", json=body).status_code, range(40)))
    assert codes == [200] * 40
    denied = 'promotion_gate_decisions_total{allowed="false",environment="",mode="enforce",reason="mutable-tag"} 40.0'

    def scrapes() -> list[str]:
        return [gate.get("/metrics").text for _ in range(12)]

    assert all(denied in text and "promotion_gate_ready 1.0" in text for text in scrapes())
    victim = max(gate.worker_pids())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while victim in gate.worker_pids() or len(gate.worker_pids()) < 2:
        assert time.monotonic() < deadline, "the dead worker should be replaced"
        time.sleep(0.2)
    assert all(denied in text and "promotion_gate_ready 1.0" in text for text in scrapes())
