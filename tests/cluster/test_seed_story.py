"""The seed's story end to end: built once, recorded by CI, promoted, deployed by digest with helm."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from tests.cluster import kit
from tests.cluster.conftest import AppImage, Release


def helm_deploy(kube: kit.Kube, namespace: str, image: AppImage, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A developer's deploy step: helm upgrade --install of the app chart, image by digest."""
    return kube.helm("upgrade", "--install", "web", str(kit.APP_CHART), "--namespace", namespace,
                     "--set", f"image.repository={image.repository}", "--set", f"image.digest={image.digest}",
                     "--wait", "--timeout", "2m", check=check)


def not_promoted(kind: str, namespace: str, name: str, field: str, image: str, environment: str,
                 promoted_to: str) -> str:
    return (f'[not-promoted] {kind} {namespace}/{name} {field} "app": {image} has no promotion record for '
            f'environment "{environment}" (promoted to: {promoted_to}). Promote it: promotion-gate promote '
            f"{image} --to {environment}")


def test_built_once_recorded_promoted_and_deployed_by_digest(release: Release, kube: kit.Kube,
                                                             app_image: Callable[[str], AppImage]) -> None:
    image = app_image("seed")
    # The image CI built carries its provenance as OCI labels.
    inspected = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image.reference}"],
        capture_output=True, text=True, check=True).stdout)
    assert inspected["Digest"] == image.digest
    assert inspected["Labels"]["git.commit"] == image.git_commit
    assert inspected["Labels"]["ci.run"] == image.ci_run

    staging = kube.namespace("shop-staging", "staging")
    production = kube.namespace("shop-prod", "production")
    store = release.store

    # Nothing is admitted before CI has recorded it.
    refused = helm_deploy(kube, staging, image, check=False)
    assert refused.returncode != 0
    assert not_promoted("Deployment", staging, "web", "spec.template.spec.containers[0]", image.reference,
                        "staging", "none") in refused.stderr

    store.record(image.reference, git_commit=image.git_commit, ci_run=image.ci_run)
    promoted = store.promote(image.reference, "staging", "ci")
    assert promoted.returncode == 0, promoted.stderr
    helm_deploy(kube, staging, image)
    (pod,) = kube.wait_running(staging, "app=web", 1)
    assert pod["spec"]["containers"][0]["image"] == image.reference
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)

    # Production: refused until two trusted keys have signed the promotion.
    refused = helm_deploy(kube, production, image, check=False)
    assert refused.returncode != 0
    assert not_promoted("Deployment", production, "web", "spec.template.spec.containers[0]", image.reference,
                        "production", "ci, staging") in refused.stderr
    one_key = store.promote(image.reference, "production", "release")
    assert one_key.returncode != 0, "one signature must not be enough for production"
    assert "2" in one_key.stderr + one_key.stdout
    two_keys = store.promote(image.reference, "production", "release", "approver-a")
    assert two_keys.returncode == 0, two_keys.stderr
    helm_deploy(kube, production, image)
    (prod_pod,) = kube.wait_running(production, "app=web", 1)
    # The same digest runs in both environments: built once, promoted, never rebuilt.
    assert prod_pod["status"]["containerStatuses"][0]["imageID"] == pod["status"]["containerStatuses"][0]["imageID"]

    trace = kit.run_cli("trace", image.reference, "--store", store.dsn, "--policy", str(store.policy_file)).stdout
    for expected in ("ci", "staging", "production", image.git_commit[:7], image.ci_run):
        assert expected in trace, trace


def test_a_tag_is_refused_with_the_exact_kubectl_text(release: Release, kube: kit.Kube,
                                                      app_image: Callable[[str], AppImage]) -> None:
    image = app_image("tag")
    staging = kube.namespace("shop-staging", "staging")
    result = kube.apply([kit.deployment("web", staging, image.tag())])
    assert result.stderr == kit.denial(
        result.path,
        f'[mutable-tag] Deployment {staging}/web spec.template.spec.containers[0] "app": image "{image.tag()}" '
        f"is a mutable tag; deploy by digest: {image.repository}@sha256:<digest>")
    assert kube.kubectl("get", "deployment", "web", "-n", staging, check=False).returncode != 0
