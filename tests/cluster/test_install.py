"""The operator's first hour: the chart installed with its defaults and the project's own image by digest."""

from __future__ import annotations

from typing import Any

from tests.cluster import kit
from tests.cluster.conftest import ClusterUnderTest, Release


def test_the_chart_runs_two_ready_webhook_replicas_and_the_operator(release: Release, kube: kit.Kube) -> None:
    namespace = release.namespace
    deployment = kube.json("get", "deployment", "promotion-gate", "-n", namespace)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["status"].get("readyReplicas") == 2
    webhook_pods = kube.wait_running(namespace, "app.kubernetes.io/component=webhook", 2)
    operator_pods = kube.wait_running(namespace, "app.kubernetes.io/component=operator", 1)
    for pod in [*webhook_pods, *operator_pods]:
        spec_container = pod["spec"]["containers"][0]
        # The chart eats its own dogfood: the image is referenced by digest, and that digest runs.
        assert spec_container["image"] == release.image
        status = pod["status"]["containerStatuses"][0]
        assert status["imageID"].endswith(release.image.split("@")[1]), status["imageID"]
        assert status["restartCount"] == 0, f"{pod['metadata']['name']} restarted"
    for pod in webhook_pods:
        container = pod["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        ready = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
    # Two replicas on different Pod IPs behind the Service the API server calls.
    endpoints = kube.json("get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=promotion-gate")
    addresses = {a for item in endpoints["items"] for e in item.get("endpoints") or []
                 if (e.get("conditions") or {}).get("ready") for a in e["addresses"]}
    assert addresses == {p["status"]["podIP"] for p in webhook_pods}


def test_pod_security_restricted_and_a_disruption_budget(release: Release, kube: kit.Kube) -> None:
    namespace = kube.json("get", "namespace", release.namespace)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The Pods were admitted by Pod Security "restricted" (enforce): they run, so they pass it. A
    # server-side dry run of the same Pod specs again reports no violation.
    for pod in kube.pods(release.namespace):
        spec: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod["metadata"]["name"] + "-dry",
                                                                 "namespace": release.namespace},
                "spec": {k: v for k, v in pod["spec"].items() if k not in ("nodeName",)}}
        result = kube.apply([spec], name="pss")
        assert "would violate PodSecurity" not in result.stderr
        assert "violates PodSecurity" not in result.stderr, result.stderr
        kube.kubectl("delete", "pod", "-n", release.namespace, spec["metadata"]["name"], "--wait=false",
                     "--ignore-not-found", check=False)
    pdb = kube.json("get", "poddisruptionbudget", "promotion-gate", "-n", release.namespace)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["status"]["currentHealthy"] == 2
    assert pdb["status"]["disruptionsAllowed"] == 1


def test_helm_test_passes(release: Release, kube: kit.Kube) -> None:
    # Posts an AdmissionReview to https://promotion-gate.promotion-gate.svc:443 (cluster DNS) over
    # verified TLS. --logs would fail: the hook deletes the succeeded Pod.
    result = kube.helm("test", release.name, "--namespace", release.namespace, "--timeout", "3m")
    assert "Phase:          Succeeded" in result.stdout, result.stdout


def test_the_api_server_reaches_the_webhook_through_its_service(release: Release, kube: kit.Kube,
                                                                cluster: ClusterUnderTest) -> None:
    config = kube.json("get", "validatingwebhookconfiguration", release.name)
    client = config["webhooks"][0]["clientConfig"]
    assert client["service"] == {"name": "promotion-gate", "namespace": release.namespace,
                                 "path": "/validate", "port": 443}
    assert client["caBundle"], "the operator keeps caBundle in sync"
    namespace = kube.namespace("install", "staging")
    result = kube.apply([kit.pod("api", namespace, "ghcr.io/acme/payment-api:1.4")])
    assert result.stderr == kit.denial(
        result.path,
        f'[mutable-tag] Pod {namespace}/api spec.containers[0] "app": image "ghcr.io/acme/payment-api:1.4" '
        "is a mutable tag; deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>")
    # The webhook Pods logged that decision: it came through the Service, not from a local process.
    logs = kube.kubectl("logs", "-n", release.namespace, "-l", "app.kubernetes.io/component=webhook",
                        "--tail=-1", check=False).stdout
    assert f'"namespace":"{namespace}"' in logs.replace(" ", "")
