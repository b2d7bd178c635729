"""Rollout safety: modes, exemptions (and bypass attempts), break-glass — through the real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tools.reviews import DIGEST, review, workload
from tools.servers import RunningServer, start_server

BASE = {
    "apiVersion": "promotion-gate.io/v1",
    "kind": "Policy",
    "namespaces": {"unmapped": "digest-only", "exempt": ["legacy-batch"], "releaseNamespace": "promotion-gate"},
    "exemptImages": [
        {"repository": "registry.k8s.io/pause"},
        {"repository": "busybox"},  # normalised: docker.io/library/busybox
        {"repository": "ghcr.io/acme/tool", "digest": DIGEST},
    ],
    "breakGlass": {"users": ["oncall@example.com"], "groups": ["platform-oncall"]},
}


def serve(tmp: Path, mode: str) -> RunningServer:
    return start_server(tmp, policy=yaml.safe_dump({**BASE, "defaultMode": mode}))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    started = {mode: serve(tmp_path_factory.mktemp(mode), mode) for mode in ("enforce", "warn", "audit")}
    yield started
    for server in started.values():
        server.stop()


def judge(server: RunningServer, body: dict) -> dict:  # type: ignore[type-arg]
    return server.post("/validate", json=body).json()["response"]  # type: ignore[no-any-return]


TAGGED = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop")
LINE = ('[mutable-tag] Deployment shop/api spec.template.spec.containers[0] "c0": image "ghcr.io/acme/api:1.4" is a '
        "mutable tag; deploy by digest: ghcr.io/acme/api@sha256:<digest>")


def test_enforce_denies(servers) -> None:  # type: ignore[no-untyped-def]
    response = judge(servers["enforce"], review(TAGGED))
    assert response["allowed"] is False
    assert response["status"]["message"] == LINE


def test_warn_allows_and_returns_each_finding_as_a_warning(servers) -> None:  # type: ignore[no-untyped-def]
    response = judge(servers["warn"], review(TAGGED))
    assert response["allowed"] is True
    assert response["warnings"] == [
        '[mutable-tag] "c0": "ghcr.io/acme/api:1.4" is a mutable tag; use ghcr.io/acme/api@sha256:<digest>']
    assert all(len(w) <= 120 for w in response["warnings"])


def test_audit_allows_silently(servers) -> None:  # type: ignore[no-untyped-def]
    response = judge(servers["audit"], review(TAGGED))
    assert response == {"uid": response["uid"], "allowed": True}


@pytest.mark.parametrize("mode", ["enforce", "warn", "audit"])
def test_every_mode_counts_the_same_findings(servers, mode: str) -> None:  # type: ignore[no-untyped-def]
    judge(servers[mode], review(workload("Pod", ["count-me:1"], namespace="count")))
    metrics = servers[mode].get("/metrics").text
    assert f'environment="",mode="{mode}",reason="mutable-tag"' in metrics
    logged = [line for line in servers[mode].log().splitlines() if '"count-me:1"' in line]
    assert len(logged) == 1 and '"reasons":["mutable-tag"' in logged[0]


EXEMPT = {  # (image, namespace): exempt by namespace, or by image wherever it runs
    **{f"namespace {ns}": ("anything:latest", ns)
       for ns in ("kube-system", "kube-public", "kube-node-lease", "promotion-gate", "legacy-batch")},
    "image, exact repository": ("registry.k8s.io/pause:3.9", "shop"),
    "image, normalised name": ("busybox:1.36", "shop"),
    "image, normalised, fully written": ("docker.io/library/busybox", "shop"),
    "image, repository plus digest": (f"ghcr.io/acme/tool@{DIGEST}", "shop"),
}


@pytest.mark.parametrize(("image", "namespace"), EXEMPT.values(), ids=EXEMPT.keys())
def test_exemptions_are_admitted_and_logged_as_exempt(servers, image: str, namespace: str) -> None:  # type: ignore[no-untyped-def]
    body = review(workload("Pod", [image], namespace=namespace))
    assert judge(servers["enforce"], body)["allowed"] is True
    assert servers["enforce"].decisions(body["request"]["uid"])[0]["reasons"] == ["exempt"]


BYPASSES = {
    "suffix on the name": "registry.k8s.io/pause-evil:1",
    "registry lookalike": "registry.k8s.io/pause.evil.example/x:1",
    "deeper path": "registry.k8s.io/pause/extra:1",
    "other registry, same path": "evil.example/registry.k8s.io/pause:1",
    "other namespace on docker hub": "evilcorp/busybox:1",
    "user-level busybox lookalike": "busybox-evil:1",
    "exempt repository, tag only": "ghcr.io/acme/tool:1.0",
}


@pytest.mark.parametrize("image", BYPASSES.values(), ids=BYPASSES.keys())
def test_exemption_bypasses_fail(servers, image: str) -> None:  # type: ignore[no-untyped-def]
    response = judge(servers["enforce"], review(workload("Pod", [image], namespace="shop")))
    assert response["allowed"] is False, image


GLASS = {"promotion-gate.io/break-glass": "INC-4711 payment outage"}


def test_break_glass_for_a_permitted_user(servers) -> None:  # type: ignore[no-untyped-def]
    body = review(workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop", annotations=GLASS),
                  user="oncall@example.com")
    response = judge(servers["enforce"], body)
    assert response["allowed"] is True
    assert response["warnings"][0] == ('[break-glass] Deployment shop/api admitted despite 1 finding(s) by '
                                       '"oncall@example.com": INC-4711 payment outage')
    (event,) = servers["enforce"].decisions(body["request"]["uid"])
    assert event["breakGlass"] == "INC-4711 payment outage" and "break-glass" in event["reasons"]
    # Without Kubernetes the server knows only the policy's namespaces: an unknown one is no label value.
    assert 'promotion_gate_break_glass_total{environment="",namespace=""} 1.0' in (
        servers["enforce"].get("/metrics").text)


def test_break_glass_through_a_group_and_the_pod_template(servers) -> None:  # type: ignore[no-untyped-def]
    obj = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop", template_annotations=GLASS)
    body = review(obj, user="bob@example.com", groups=["system:authenticated", "platform-oncall"])
    assert judge(servers["enforce"], body)["allowed"] is True


REFUSED = {
    "user not allowed": ("mallory@example.com", GLASS,
                         'user "mallory@example.com" is not allowed to break glass'),
    "empty reason": ("oncall@example.com", {"promotion-gate.io/break-glass": "  "},
                     "the annotation needs a non-empty reason or ticket"),
}


@pytest.mark.parametrize(("user", "annotations", "why"), REFUSED.values(), ids=REFUSED.keys())
def test_break_glass_refused(servers, user: str, annotations: dict, why: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    body = review(workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop",
                           annotations=annotations), user=user)
    response = judge(servers["enforce"], body)
    assert response["allowed"] is False
    assert response["status"]["message"] == (
        f"{LINE}\n[break-glass] annotation promotion-gate.io/break-glass ignored: {why}")


def _owned(obj: dict, kind: str = "ReplicaSet") -> dict:  # type: ignore[type-arg]
    obj["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": "api-7d9", "uid": "u",
                                           "controller": True}]
    return obj


CONTROLLER = "system:serviceaccount:kube-system:replicaset-controller"
INHERITED = {
    "pod created by the ReplicaSet controller from a break-glass template": (
        _owned(workload("Pod", ["ghcr.io/acme/api:1.4"], name="api-7d9-x", namespace="shop", annotations=GLASS)),
        CONTROLLER, True),
    "same pod created by a person": (
        _owned(workload("Pod", ["ghcr.io/acme/api:1.4"], name="api-7d9-x", namespace="shop", annotations=GLASS)),
        "mallory@example.com", False),
    "controller identity without an owner": (
        workload("Pod", ["ghcr.io/acme/api:1.4"], name="api-7d9-x", namespace="shop", annotations=GLASS),
        CONTROLLER, False),
    "controller-created pod without the annotation": (
        _owned(workload("Pod", ["ghcr.io/acme/api:1.4"], name="api-7d9-x", namespace="shop")), CONTROLLER, False),
}


@pytest.mark.parametrize(("obj", "user", "allowed"), INHERITED.values(), ids=INHERITED.keys())
def test_break_glass_is_carried_by_controllers_to_the_pods(servers, obj: dict, user: str, allowed: bool) -> None:  # type: ignore[no-untyped-def,type-arg]
    body = review(obj, user=user, groups=["system:serviceaccounts"])
    assert judge(servers["enforce"], body)["allowed"] is allowed


def test_adding_the_annotation_alone_is_judged_in_full(servers) -> None:  # type: ignore[no-untyped-def]
    # The tag Deployment predates the policy; annotating it changes no image, but it would let its Pods in.
    old = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop")
    new = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop", template_annotations=GLASS)
    refused = judge(servers["enforce"], review(new, old=old, operation="UPDATE", user="mallory@example.com"))
    assert refused["allowed"] is False
    assert refused["status"]["message"].endswith(
        '[break-glass] annotation promotion-gate.io/break-glass ignored: user "mallory@example.com" is not allowed '
        "to break glass")
    permitted = judge(servers["enforce"], review(new, old=old, operation="UPDATE", user="oncall@example.com"))
    assert permitted["allowed"] is True


def test_refused_break_glass_is_in_the_audit_event(servers) -> None:  # type: ignore[no-untyped-def]
    body = review(workload("Pod", ["ghcr.io/acme/api:1.4"], name="p", namespace="shop", annotations=GLASS),
                  user="mallory@example.com")
    judge(servers["enforce"], body)
    (event,) = servers["enforce"].decisions(body["request"]["uid"])
    assert event["breakGlassRefused"] == 'user "mallory@example.com" is not allowed to break glass'


def test_unknown_paths_do_not_create_metric_series(servers) -> None:  # type: ignore[no-untyped-def]
    for path in ("/wp-admin/x.php", "/etc/passwd", "/a/b/c"):
        assert servers["enforce"].get(path).status_code == 404
    metrics = servers["enforce"].get("/metrics").text
    assert 'promotion_gate_malformed_requests_total{code="404",endpoint="other"} 3.0' in metrics
    assert "wp-admin" not in metrics


PINNED_GLASS = workload("Deployment", [f"ghcr.io/acme/api@{DIGEST}"], name="api", namespace="shop",
                        template_annotations=GLASS)


def test_only_permitted_people_may_set_the_annotation_even_on_clean_workloads(servers) -> None:  # type: ignore[no-untyped-def]
    # Controllers carry the annotation to every future Pod: setting it is itself the privileged act.
    refused = judge(servers["enforce"], review(PINNED_GLASS, user="mallory@example.com"))
    assert refused["allowed"] is False
    assert refused["status"]["message"] == (
        "[break-glass] Deployment shop/api: only people allowed to break glass may set the "
        'promotion-gate.io/break-glass annotation; user "mallory@example.com" is not allowed to break glass')
    assert judge(servers["enforce"], review(PINNED_GLASS, user="oncall@example.com"))["allowed"] is True
    # warn and audit modes only report
    assert judge(servers["warn"], review(PINNED_GLASS, user="mallory@example.com"))["allowed"] is True


def test_removing_the_annotation_is_never_blocked(servers) -> None:  # type: ignore[no-untyped-def]
    old = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop", template_annotations=GLASS)
    new = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop")
    assert judge(servers["enforce"], review(new, old=old, operation="UPDATE", user="mallory@example.com"))["allowed"]


def test_updating_a_break_glass_workload_to_a_digest_needs_no_permission(servers) -> None:  # type: ignore[no-untyped-def]
    old = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop", template_annotations=GLASS)
    assert judge(servers["enforce"], review(PINNED_GLASS, old=old, operation="UPDATE",
                                            user="dev@example.com"))["allowed"] is True
