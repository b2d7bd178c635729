"""Controllers in the loop: the Deployment, ReplicaSet, CronJob and Job controllers create the objects
that the webhook judges, with their own identities, and report its denials as events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from tests.cluster import kit
from tests.cluster.conftest import AppImage, Release


def deployed(kube: kit.Kube, store: kit.Store, image: AppImage, namespace: str, name: str) -> dict[str, Any]:
    store.promoted(image.reference, image.git_commit, image.ci_run)
    result = kube.apply([kit.deployment(name, namespace, image.reference)])
    assert result.returncode == 0, result.stderr
    (pod,) = kube.wait_running(namespace, f"app={name}", 1)
    return pod


def refused_now(kube: kit.Kube, namespace: str, image: AppImage, needle: str) -> None:
    """Wait until the webhooks' verdict caches have caught up with a revocation (policy cacheSeconds)."""

    def refused() -> bool:
        probe = kube.kubectl("run", f"probe-{uuid.uuid4().hex[:5]}", "-n", namespace, f"--image={image.reference}",
                             "--restart=Never", "--dry-run=server", check=False)
        return probe.returncode != 0 and needle in probe.stderr

    kit.wait_for(f"a Pod with {image.reference} to be refused ({needle})", refused, timeout=60)


def short(warning: str) -> str:
    """kubectl warnings are cut to 120 characters (docs/rollout.md)."""
    return warning if len(warning) <= 120 else warning[:119] + "…"


def failed_create_events(kube: kit.Kube, namespace: str, needle: str) -> list[dict[str, Any]]:
    return [e for e in kube.events(namespace, "FailedCreate") if needle in e.get("message", "")]


def test_a_revoked_digest_stops_the_replicaset_from_creating_pods(release: Release, kube: kit.Kube,
                                                                   app_image: Callable[[str], AppImage]) -> None:
    image = app_image("revoked")
    namespace = kube.namespace("api-staging", "staging")
    old_pod = deployed(kube, release.store, image, namespace, "api")

    release.store.revoke(image.reference, "staging", "CVE-2026-0001 in the base image")
    refused_now(kube, namespace, image, "revoked from staging")
    kube.kubectl("rollout", "restart", "deployment/api", "-n", namespace)

    needle = f'denied the request: [not-promoted] Pod {namespace}/api-'

    def outcome() -> tuple[str, list[dict[str, Any]]] | None:
        if failed := failed_create_events(kube, namespace, needle):
            return "pods refused", failed
        refused_rs = [e for e in kube.events(namespace, "ReplicaSetCreateError")
                      if f"[not-promoted] ReplicaSet {namespace}/api-" in e.get("message", "")]
        return ("replicaset refused", refused_rs) if refused_rs else None

    what, events = kit.wait_for("a FailedCreate event with the webhook's message", outcome, timeout=90,
                                describe=lambda: kube.describe_namespace(namespace))
    assert what == "pods refused", (
        "the webhook refused the Deployment controller's new ReplicaSet itself, so no Pod was attempted and "
        f"there is no FailedCreate event; the Deployment's event: {events[0]['message']}")
    message = events[0]["message"]
    assert message.startswith('Error creating: admission webhook "validate.promotion-gate.io" denied the request: '
                              f'[not-promoted] Pod {namespace}/api-'), message
    assert (f'spec.containers[0] "app": {image.reference} has no promotion record for environment "staging" '
            "(promoted to: ci; revoked from staging)") in message, message
    assert events[0]["involvedObject"]["kind"] == "ReplicaSet"
    # kubectl get events shows the same to whoever deploys.
    listed = kube.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate").stdout
    assert "[not-promoted]" in listed
    # The old Pod keeps running: a refused rollout never takes the running version down.
    pods = kube.pods(namespace, "app=api")
    assert old_pod["metadata"]["name"] in {p["metadata"]["name"] for p in pods}


def test_a_revoked_digest_stops_a_scale_up_with_failed_create_events(
        release: Release, kube: kit.Kube, app_image: Callable[[str], AppImage]) -> None:
    image = app_image("scale")
    namespace = kube.namespace("web-staging", "staging")
    deployed(kube, release.store, image, namespace, "web")
    release.store.revoke(image.reference, "staging", "CVE-2026-0004")
    refused_now(kube, namespace, image, "revoked from staging")
    # Scaling changes no image: the Deployment and its ReplicaSet are updated; the ReplicaSet
    # controller's new Pod is judged and refused.
    kube.kubectl("scale", "deployment/web", "-n", namespace, "--replicas=2")
    needle = f"denied the request: [not-promoted] Pod {namespace}/web-"
    events = kit.wait_for("a FailedCreate event with the webhook's message",
                          lambda: failed_create_events(kube, namespace, needle), timeout=90,
                          describe=lambda: kube.describe_namespace(namespace))
    assert events[0]["involvedObject"]["kind"] == "ReplicaSet"
    assert events[0]["message"].startswith(
        'Error creating: admission webhook "validate.promotion-gate.io" denied the request: '
        f"[not-promoted] Pod {namespace}/web-"), events[0]["message"]
    assert "(promoted to: ci; revoked from staging)" in events[0]["message"]
    assert len([p for p in kube.pods(namespace, "app=web") if p["status"].get("phase") == "Running"]) == 1


def test_break_glass_by_a_permitted_user_lets_the_controllers_create_the_pods(
        release: Release, kube: kit.Kube, app_image: Callable[[str], AppImage]) -> None:
    image = app_image("break-glass")
    namespace = kube.namespace("hotfix-staging", "staging")
    deployed(kube, release.store, image, namespace, "hotfix")
    for user in (kit.ONCALL, "mallory@example.com"):
        kube.kubectl("create", "rolebinding", f"edit-{user.split('@')[0]}", "-n", namespace, "--clusterrole=edit",
                     f"--user={user}")
    release.store.revoke(image.reference, "staging", "CVE-2026-0002")
    refused_now(kube, namespace, image, "revoked from staging")

    def annotate(user: str) -> Any:
        patch = json.dumps({"spec": {"template": {"metadata": {"annotations": {
            kit.BREAK_GLASS: "INC-42 checkout outage"}}}}})
        return kube.kubectl("patch", "deployment", "hotfix", "-n", namespace, "--type=merge", "-p", patch,
                            user=user, check=False)

    refused = annotate("mallory@example.com")
    assert refused.returncode != 0
    assert ('[break-glass] annotation promotion-gate.io/break-glass ignored: user "mallory@example.com" is not '
            "allowed to break glass") in refused.stderr, refused.stderr

    admitted = annotate(kit.ONCALL)
    assert admitted.returncode == 0, admitted.stderr
    assert admitted.stderr.splitlines()[0] == "Warning: " + short(
        f'[break-glass] Deployment {namespace}/hotfix admitted despite 1 finding(s) by "{kit.ONCALL}": '
        "INC-42 checkout outage"), admitted.stderr

    def rolled_out() -> bool:
        pods = kube.pods(namespace, "app=hotfix")
        fresh = [p for p in pods if kit.BREAK_GLASS in (p["metadata"].get("annotations") or {})
                 and p["status"].get("phase") == "Running"]
        return len(fresh) == 1

    kit.wait_for("the controllers' break-glass Pod to run", rolled_out, timeout=120,
                 describe=lambda: kube.describe_namespace(namespace))

    events = release.store.audit("--reason", "break-glass", "--namespace", namespace)
    by_kind = {e["kind"]: e for e in events}
    assert by_kind["Deployment"]["user"] == kit.ONCALL
    assert by_kind["Deployment"]["breakGlass"] == "INC-42 checkout outage"
    assert "ReplicaSet" not in by_kind  # made by the deployment controller for its owner: not judged again
    assert by_kind["Pod"]["user"] in ("system:serviceaccount:kube-system:replicaset-controller",
                                      "system:kube-controller-manager")
    assert all(e["allowed"] for e in events)
    refusals = [e for e in release.store.audit("--denied", "--namespace", namespace, "--user", "mallory@example.com")
                if e.get("breakGlassRefused")]
    assert refusals and refusals[0]["kind"] == "Deployment"


def test_a_cronjobs_jobs_and_pods_are_judged(release: Release, kube: kit.Kube,
                                              app_image: Callable[[str], AppImage]) -> None:
    good, revoked = app_image("cron-good"), app_image("cron-revoked")
    namespace = kube.namespace("batch-staging", "staging")
    for image in (good, revoked):
        release.store.promoted(image.reference, image.git_commit, image.ci_run)
    for name, image in (("report", good), ("cleanup", revoked)):
        result = kube.apply([kit.cronjob(name, namespace, image.reference)])
        assert result.returncode == 0, result.stderr
    release.store.revoke(revoked.reference, "staging", "CVE-2026-0003")
    refused_now(kube, namespace, revoked, "revoked from staging")

    # The CronJob controller creates a Job every minute (not judged again: its CronJob was), the Job
    # controller its Pod, which is judged: the revoked digest's Pods are refused on the Job.
    def succeeded() -> bool:
        pods = kube.pods(namespace, "cron=report")
        return any(p["status"].get("phase") == "Succeeded" for p in pods)

    kit.wait_for("a Job of CronJob report to run to completion", succeeded, timeout=150,
                 describe=lambda: kube.describe_namespace(namespace))
    needle = f"[not-promoted] Pod {namespace}/cleanup-"
    events = kit.wait_for("the Job controller's FailedCreate event for cleanup",
                          lambda: [e for e in kube.events(namespace) if needle in e.get("message", "")],
                          timeout=90, describe=lambda: kube.describe_namespace(namespace))
    assert (events[0]["involvedObject"]["kind"], events[0]["reason"]) == ("Job", "FailedCreate")
    assert "revoked from staging" in events[0]["message"]

    judged = release.store.audit("--namespace", namespace, "--allowed")
    by_kind = {e["kind"]: e for e in judged if e["name"].startswith("report") and e["operation"] == "CREATE"}
    assert by_kind["Job"]["user"] == "system:serviceaccount:kube-system:cronjob-controller"
    assert by_kind["Job"]["skipped"].startswith("Job created by system:serviceaccount:kube-system:cronjob-controller")
    assert by_kind["Pod"]["user"] == "system:serviceaccount:kube-system:job-controller"
    assert not by_kind["Pod"]["skipped"]
