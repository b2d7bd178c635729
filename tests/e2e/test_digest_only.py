"""Digest-only admission, proven through a real kube-apiserver with real clients (kubectl, kubernetes).

The webhook is registered from the chart (``tests/e2e/gate.py``); its policy maps no namespace to an
environment (``namespaces: {unmapped: digest-only}``), so only the digest rule applies here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import LegacyWorkload, register_logs, start_webhook, unregister_logs
from tests.e2e.gate import Applied, Apply
from tests.e2e.manifests import DIGEST, PINNED, TAGGED, Manifest
from tools.servers import RunningServer

pytestmark = pytest.mark.e2e

WEBHOOK = gate_mod.WEBHOOK_NAME
FIX = "deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>"



def denied(path: Path, *lines: str) -> str:
    """kubectl's whole stderr for a webhook denial of a created object: one line per finding."""
    return (f'Error from server (Forbidden): error when creating "{path}": '
            f'admission webhook "{WEBHOOK}" denied the request: ' + "\n".join(lines) + "\n")


def mutable_tag(subject: str, field: str, container: str, image: str = TAGGED, fix: str = FIX) -> str:
    return f'[mutable-tag] {subject} {field} "{container}": image "{image}" is a mutable tag; {fix}'


def stored(cluster: Cluster, namespace: str, resource: str) -> bool:
    return cluster.kubectl("get", resource, "-n", namespace, "-o", "name", check=False).returncode == 0


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    resource: str  # for kubectl get
    field: str  # where the judged image sits
    container: str
    build: Callable[[str, str], Manifest]  # (namespace, image) -> manifest
    created: str  # kubectl apply's answer


CASES = [
    Case("Deployment", "payment-api", "deployment/payment-api", "spec.template.spec.containers[0]", "api",
         lambda ns, image: manifests.deployment("payment-api", ns, {"api": image}),
         "deployment.apps/payment-api created"),
    Case("Pod", "payment-api", "pod/payment-api", "spec.containers[0]", "api",
         lambda ns, image: manifests.pod("payment-api", ns, {"api": image}), "pod/payment-api created"),
    Case("CronJob", "settlement", "cronjob/settlement", "spec.jobTemplate.spec.template.spec.containers[0]",
         "report", lambda ns, image: manifests.cronjob("settlement", ns, {"report": image}),
         "cronjob.batch/settlement created"),
    Case("Pod", "payment-api", "pod/payment-api", "spec.initContainers[0]", "migrate",
         lambda ns, image: manifests.pod("payment-api", ns, {"api": PINNED}, init_images={"migrate": image}),
         "pod/payment-api created"),
]
CASE_IDS = ["deployment", "pod", "cronjob", "init-container"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kubectl_apply_of_a_mutable_tag_is_denied_with_the_exact_fix(
        gate: gate_mod.Gate, cluster: Cluster, namespace: str, kubectl_apply: Apply, case: Case) -> None:
    result = kubectl_apply(case.build(namespace, TAGGED))
    assert result.returncode == 1
    subject = f"{case.kind} {namespace}/{case.name}"
    assert result.stderr == denied(result.path, mutable_tag(subject, case.field, case.container))
    assert not stored(cluster, namespace, case.resource)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_digest_is_admitted(gate: gate_mod.Gate, cluster: Cluster, namespace: str, kubectl_apply: Apply,
                              case: Case) -> None:
    result = kubectl_apply(case.build(namespace, PINNED))
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, case.created, "")
    images = cluster.kubectl("get", case.resource, "-n", namespace, "-o", "jsonpath={..image}").stdout.split()
    assert PINNED in images


def test_every_finding_of_the_request_is_in_one_denial(gate: gate_mod.Gate, namespace: str,
                                                      kubectl_apply: Apply) -> None:
    shop = manifests.deployment("shop", namespace, {"api": PINNED, "sidecar": "envoyproxy/envoy:v1.31"},
                                init_images={"init": "busybox"})
    result = kubectl_apply(shop)
    subject = f"Deployment {namespace}/shop"
    assert result.stderr == denied(
        result.path,
        f'[mutable-tag] {subject} spec.template.spec.initContainers[0] "init": image "busybox" is a '
        'mutable tag (no tag: implicitly "latest"); deploy by digest: busybox@sha256:<digest>',
        mutable_tag(subject, "spec.template.spec.containers[1]", "sidecar", "envoyproxy/envoy:v1.31",
                    "deploy by digest: envoyproxy/envoy@sha256:<digest>"),
    )


def test_a_tag_next_to_a_digest_is_admitted_with_a_warning(gate: gate_mod.Gate, namespace: str,
                                                          kubectl_apply: Apply) -> None:
    result = kubectl_apply(manifests.pod("web", namespace, {"nginx": f"nginx:1.25@{DIGEST}"}))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        'Warning: spec.containers[0] "nginx": tag "1.25" is ignored, the digest is pulled\n')


def test_the_python_client_gets_a_403_status_naming_the_webhook(gate: gate_mod.Gate, core: Any,
                                                              namespace: str) -> None:
    with pytest.raises(ApiException) as raised:
        core.create_namespaced_pod(namespace, manifests.pod("payment-api", namespace, {"api": TAGGED}))
    status = json.loads(raised.value.body or "{}")
    assert raised.value.status == 403
    assert (status["kind"], status["status"], status["reason"], status["code"]) == ("Status", "Failure",
                                                                                   "Forbidden", 403)
    assert status["message"] == (f'admission webhook "{WEBHOOK}" denied the request: '
                                 + mutable_tag(f"Pod {namespace}/payment-api", "spec.containers[0]", "api"))


def test_labels_mean_nothing_to_a_policy_without_environments(gate: gate_mod.Gate, core: Any,
                                                             kubectl_apply: Apply) -> None:
    # This gate's policy defines no environments: it is digest-only everywhere, whatever a namespace
    # is labelled. (Label-driven promotion checks are proven in test_promotion.py.)
    namespace = gate_mod.create_namespace(core, "e2e-payments-prod",
                                          {"promotion-gate.io/environment": "production"})
    result = kubectl_apply(manifests.pod("api", namespace, {"api": PINNED}))
    assert result.returncode == 0, result.stderr


# --- kubectl debug: the pods/ephemeralcontainers subresource --------------------------------------------


@pytest.fixture
def pinned_pod(gate: gate_mod.Gate, core: Any, namespace: str) -> str:
    """A digest-pinned Pod (never scheduled: there are no nodes; ephemeral containers need none)."""
    core.create_namespaced_pod(namespace, manifests.pod("api", namespace, {"api": PINNED}))
    return "api"


def ephemeral_images(core: Any, namespace: str, pod: str) -> list[str]:
    spec = core.read_namespaced_pod(pod, namespace).spec
    return [c.image for c in spec.ephemeral_containers or []]


def test_kubectl_debug_with_a_tag_is_denied(cluster: Cluster, core: Any, namespace: str,
                                            pinned_pod: str) -> None:
    result = cluster.kubectl("debug", pinned_pod, "-n", namespace, "--image=busybox:1.36",
                             "--profile=general", "--container=debugger", check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f'Error from server (Forbidden): admission webhook "{WEBHOOK}" denied the request: [mutable-tag] Pod '
        f'{namespace}/{pinned_pod} spec.ephemeralContainers[0] "debugger": image "busybox:1.36" is a '
        "mutable tag; deploy by digest: busybox@sha256:<digest>\n"
    )
    assert ephemeral_images(core, namespace, pinned_pod) == []


def test_kubectl_debug_with_a_digest_is_allowed(cluster: Cluster, core: Any, namespace: str,
                                                pinned_pod: str) -> None:
    image = f"busybox@{DIGEST}"
    cluster.kubectl("debug", pinned_pod, "-n", namespace, f"--image={image}", "--profile=general",
                    "--container=debugger")
    assert ephemeral_images(core, namespace, pinned_pod) == [image]


def test_an_ephemeral_container_patch_from_the_python_client_is_judged(core: Any, namespace: str,
                                                                       pinned_pod: str) -> None:
    def patch(image: str) -> Any:
        body = {"spec": {"ephemeralContainers": [{"name": "debugger", "image": image}]}}
        return core.patch_namespaced_pod_ephemeralcontainers(
            pinned_pod, namespace, body, _content_type="application/strategic-merge-patch+json")

    with pytest.raises(ApiException) as raised:
        patch("busybox:1.36")
    assert raised.value.status == 403
    assert '[mutable-tag] Pod' in json.loads(raised.value.body or "{}")["message"]
    patch(f"busybox@{DIGEST}")
    assert ephemeral_images(core, namespace, pinned_pod) == [f"busybox@{DIGEST}"]


# --- what must keep working -----------------------------------------------------------------------


@pytest.fixture(params=["pinned", "legacy-tag"])
def existing_deployment(request: pytest.FixtureRequest, gate: gate_mod.Gate, apps: Any,
                        namespace: str) -> tuple[str, str]:
    """A Deployment already in the cluster: pinned (admitted by the webhook) or tagged (stored before it)."""
    if request.param == "legacy-tag":
        legacy: LegacyWorkload = request.getfixturevalue("legacy_deployment")
        return legacy.namespace, legacy.name
    apps.create_namespaced_deployment(namespace,
                                      manifests.deployment("payment-api", namespace, {"api": PINNED}))
    return namespace, "payment-api"


def test_changes_that_introduce_no_image_are_never_blocked(cluster: Cluster, apps: Any,
                                                           existing_deployment: tuple[str, str]) -> None:
    namespace, name = existing_deployment
    target = f"deployment/{name}"
    steps = [
        ["scale", target, "--replicas=0"],  # through the scale subresource
        ["patch", target, "--type=merge", "-p", '{"spec":{"replicas":1}}'],  # an UPDATE the webhook judges
        ["label", target, "team=payments"],
        ["annotate", target, "promotion-gate.io/owner=payments"],
        ["rollout", "restart", target],  # changes the pod template, not its images
    ]
    for step in steps:
        result = cluster.kubectl(*step, "-n", namespace, check=False)
        assert result.returncode == 0, f"kubectl {' '.join(step)}: {result.stderr}"
    assert apps.read_namespaced_deployment(name, namespace).metadata.labels["team"] == "payments"
    cluster.kubectl("delete", target, "-n", namespace)
    assert not stored(cluster, namespace, target)


def test_an_update_that_introduces_a_tag_is_denied(cluster: Cluster, apps: Any, namespace: str,
                                                   gate: gate_mod.Gate) -> None:
    apps.create_namespaced_deployment(namespace,
                                      manifests.deployment("payment-api", namespace, {"api": PINNED}))
    result = cluster.kubectl("set", "image", "deployment/payment-api", "api=ghcr.io/acme/payment-api:1.5",
                             "-n", namespace, check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "error: failed to patch image update to pod template: "
        f'admission webhook "{WEBHOOK}" denied the request: '
        + mutable_tag(f"Deployment {namespace}/payment-api", "spec.template.spec.containers[0]", "api",
                      "ghcr.io/acme/payment-api:1.5") + "\n"
    )
    images = cluster.kubectl("get", "deployment/payment-api", "-n", namespace, "-o", "jsonpath={..image}")
    assert images.stdout == PINNED


@pytest.mark.parametrize("exempt_namespace", ["kube-system", gate_mod.RELEASE_NAMESPACE])
def test_system_and_release_namespaces_are_exempt(gate: gate_mod.Gate, cluster: Cluster, kubectl_apply: Apply,
                                                  exempt_namespace: str) -> None:
    # The release namespace may not exist yet (nothing is installed in the local cluster).
    cluster.kubectl("create", "namespace", exempt_namespace, check=False)
    name = gate_mod.unique_name("e2e-exempt")
    result = kubectl_apply(manifests.pod(name, exempt_namespace, {"pause": "registry.k8s.io/pause:3.10"}))
    try:
        assert (result.returncode, result.stdout.strip(), result.stderr) == (0, f"pod/{name} created", "")
    finally:
        cluster.kubectl("delete", "pod", name, "-n", exempt_namespace, "--ignore-not-found", "--wait=false",
                        check=False)


def test_server_side_dry_run_is_judged_like_the_real_request(gate: gate_mod.Gate, cluster: Cluster,
                                                            namespace: str, kubectl_apply: Apply) -> None:
    dry_run = ("--dry-run=server",)
    tagged = kubectl_apply(manifests.deployment("payment-api", namespace, {"api": TAGGED}), args=dry_run)
    assert tagged.returncode == 1
    assert tagged.stderr == denied(tagged.path, mutable_tag(f"Deployment {namespace}/payment-api",
                                                            "spec.template.spec.containers[0]", "api"))
    pinned = kubectl_apply(manifests.deployment("payment-api", namespace, {"api": PINNED}), args=dry_run)
    assert (pinned.returncode, pinned.stdout.strip(), pinned.stderr) == (
        0, "deployment.apps/payment-api created (server dry run)", "")
    assert not stored(cluster, namespace, "deployment/payment-api")


# --- the webhook down: failurePolicy ------------------------------------------------------------------
# Its own server and its own configuration (another release name, opt-in namespace selector), so only
# the namespace labelled for it is affected, whatever order the tests run in.


@dataclass
class Outage:
    server: RunningServer
    namespace: str
    release: str = "e2e-outage"

    def register(self, cluster: Cluster, failure_policy: str) -> gate_mod.Gate:
        return gate_mod.register_local(cluster, self.server, release=self.release,
                                       failure_policy=failure_policy,
                                       extra_set=["webhook.namespaceSelector.mode=optIn"])


@pytest.fixture
def outage(gate: gate_mod.Gate, cluster: Cluster, core: Any, tmp_path: Path,
           pytestconfig: pytest.Config) -> Iterator[Outage]:
    if cluster.kind != "local":
        pytest.skip("needs a webhook process outside the cluster (PROMOTION_GATE_CLUSTER=local)")
    server = start_webhook(cluster, tmp_path / "outage-webhook")
    namespace = gate_mod.create_namespace(core, "e2e-outage", {gate_mod.ENFORCE_LABEL: "true"})
    state = Outage(server, namespace)
    registered = state.register(cluster, "Fail")
    register_logs(pytestconfig, registered.logs)
    try:
        yield state
    finally:
        registered.unregister()
        server.stop()
        unregister_logs(pytestconfig, registered.logs)


def test_failure_policy_decides_when_the_webhook_is_down(cluster: Cluster, outage: Outage,
                                                         kubectl_apply: Apply) -> None:
    namespace, names = outage.namespace, iter(f"api-{i}" for i in range(1_000_000))

    def seen_by_outage_server() -> bool | None:
        name = next(names)
        kubectl_apply(manifests.pod(name, namespace, {"api": PINNED}))
        return True if f'"name":"{name}"' in outage.server.log() else None

    gate_mod.eventually(seen_by_outage_server, what="the outage webhook to be called")
    outage.server.stop()

    def refused() -> Applied | None:
        result = kubectl_apply(manifests.pod(next(names), namespace, {"api": PINNED}))
        return result if result.returncode != 0 else None

    result = gate_mod.eventually(refused, what="failurePolicy Fail to refuse pods")
    assert result.stderr.startswith(
        f'Error from server (InternalError): error when creating "{result.path}": '
        f'Internal error occurred: failed calling webhook "{WEBHOOK}": ')
    assert f'Post "{outage.server.url}/validate?timeout=10s"' in result.stderr
    assert "connection refused" in result.stderr

    outage.register(cluster, "Ignore")

    def admitted() -> Applied | None:
        result = kubectl_apply(manifests.pod(next(names), namespace, {"api": PINNED}))
        return result if result.returncode == 0 else None

    gate_mod.eventually(admitted, what="failurePolicy Ignore to admit pods")
    # The other registration is untouched: the running gate still judges this namespace.
    tagged = kubectl_apply(manifests.pod("tagged", namespace, {"api": TAGGED}))
    assert f'admission webhook "{WEBHOOK}" denied the request: [mutable-tag]' in tagged.stderr
