"""Rolling enforcement out, through a real kube-apiserver: warn and audit modes, and break-glass.

Each test runs a webhook server of its own (``tests/e2e/gate.py``: SoloGate) with the promotion kit's
policy in one ``defaultMode``; the namespace is labelled ``staging``, so a tag is the only finding.
Break-glass is exercised the way it happens on call: the admin impersonates the person (``kubectl
--as``), who may create Deployments in the namespace through RoleBindings granting what the built-in
``edit`` ClusterRole grants, like any developer (see ``grant_edit``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import solo_gate
from tests.e2e.gate import Apply, SoloGate
from tests.e2e.manifests import TAGGED
from tools.promotion_kit import make_kit
from webhook.core.review import MAX_WARNING_CHARS

pytestmark = pytest.mark.e2e

WEBHOOK = gate_mod.WEBHOOK_NAME
BREAK_GLASS = "promotion-gate.io/break-glass"
FIX = "deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>"

GateInMode = Callable[[str], SoloGate]


@pytest.fixture
def gate_in_mode(request: pytest.FixtureRequest, cluster: Cluster, core: Any, gate: gate_mod.Gate,
                 tmp_path: Path) -> Iterator[GateInMode]:
    """Start this test's gate with the kit's policy in ``defaultMode`` ``mode`` (one per test)."""
    with ExitStack() as stack:
        def start(mode: str) -> SoloGate:
            kit = make_kit(tmp_path / "kit", mode=mode)
            return stack.enter_context(solo_gate(cluster, core, request.config, tmp_path / "webhook",
                                                 release=f"e2e-rollout-{mode}", policy=kit.policy_path.read_text(),
                                                 session_gate=gate, store=f"sqlite:///{tmp_path / 'store.db'}",
                                                 extra=["--server-key", str(kit.key("ci"))]))

        yield start


def mutable_tag(namespace: str, name: str) -> str:
    return (f'[mutable-tag] Deployment {namespace}/{name} spec.template.spec.containers[0] "api": image "{TAGGED}" '
            f"is a mutable tag; {FIX}")


# kubectl prints each warning on its own line. Ours name the container and carry the fix, in at most
# MAX_WARNING_CHARS characters (kubectl already names the object; the full finding is in the audit log).
TAG_WARNING = f'Warning: [mutable-tag] "api": "{TAGGED}" is a mutable tag; use ghcr.io/acme/payment-api@sha256:<digest>\n'
LONG_IMAGE = "registry.example.com/platform/payments/settlement/payment-api-settlement-reporter:2024.11.26-rc.1"


def as_warning(line: str) -> str:
    """How kubectl prints one of our warnings: cut to MAX_WARNING_CHARS with an ellipsis when longer."""
    short = line if len(line) <= MAX_WARNING_CHARS else line[: MAX_WARNING_CHARS - 1] + "…"
    return f"Warning: {short}\n"


def tagged_deployment(name: str, namespace: str, break_glass: str | None = None,
                      images: dict[str, str] | None = None) -> manifests.Manifest:
    document = manifests.deployment(name, namespace, images or {"api": TAGGED})
    if break_glass is not None:
        document["metadata"]["annotations"] = {BREAK_GLASS: break_glass}
    return document


def test_warn_mode_admits_a_tag_and_kubectl_shows_the_finding(gate_in_mode: GateInMode, cluster: Cluster,
                                                              kubectl_apply: Apply) -> None:
    solo = gate_in_mode("warn")
    namespace = solo.namespace("e2e-rollout-warn", environment="staging")
    result = kubectl_apply(tagged_deployment("payment-api", namespace,
                                             images={"api": TAGGED, "reporter": LONG_IMAGE}))
    long_warning = (f'[mutable-tag] "reporter": "{LONG_IMAGE}" is a mutable tag; use '
                    f"{LONG_IMAGE.rsplit(':', 1)[0]}@sha256:<digest>")
    assert len(long_warning) > MAX_WARNING_CHARS  # so the cut is under test too
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "deployment.apps/payment-api created\n", TAG_WARNING + as_warning(long_warning))
    assert as_warning(long_warning).endswith("…\n")
    [decision] = gate_mod.decision_for(solo.server, namespace, "payment-api")
    assert (decision["allowed"], decision["mode"], decision["reasons"]) == (True, "warn", ["mutable-tag", "warn-only"])
    # The decision log keeps every finding whole.
    assert decision["findings"] == [
        mutable_tag(namespace, "payment-api"),
        f'[mutable-tag] Deployment {namespace}/payment-api spec.template.spec.containers[1] "reporter": image '
        f'"{LONG_IMAGE}" is a mutable tag; deploy by digest: {LONG_IMAGE.rsplit(":", 1)[0]}@sha256:<digest>']


def test_audit_mode_admits_a_tag_silently_and_logs_the_decision(gate_in_mode: GateInMode, cluster: Cluster,
                                                                kubectl_apply: Apply) -> None:
    solo = gate_in_mode("audit")
    namespace = solo.namespace("e2e-rollout-audit", environment="staging")
    result = kubectl_apply(tagged_deployment("payment-api", namespace))
    assert (result.returncode, result.stdout, result.stderr) == (0, "deployment.apps/payment-api created\n", "")
    [decision] = gate_mod.decision_for(solo.server, namespace, "payment-api")
    assert (decision["allowed"], decision["mode"], decision["reasons"], decision["findings"]) == (
        True, "audit", ["mutable-tag", "warn-only"], [mutable_tag(namespace, "payment-api")])
    assert (decision["kind"], decision["operation"], decision["user"]) == ("Deployment", "CREATE", "admin")


# --- break-glass ------------------------------------------------------------------------------------


def grant_edit(cluster: Cluster, namespace: str) -> None:
    """What a platform team does for its developers and its on-call group: ``edit`` in the namespace.

    The built-in ``edit`` ClusterRole is an aggregation: kube-controller-manager fills its rules in from
    the bootstrap roles labelled aggregate-to-edit (and, through ``view``, aggregate-to-view). This
    control plane runs no controller manager, so ``edit`` has ``rules: null`` here; the bindings name the
    two roles it is built from, which grant the same and exist in every cluster.
    """
    for role in ("system:aggregate-to-edit", "system:aggregate-to-view"):
        cluster.kubectl("create", "rolebinding", f"developers-{role.rsplit('-', 1)[-1]}", f"--clusterrole={role}",
                        "-n", namespace, "--user=oncall@example.com", "--user=mallory@example.com",
                        "--group=platform-oncall")

    def can_create(*identity: str) -> Callable[[], bool | None]:
        def attempt() -> bool | None:
            result = cluster.kubectl("auth", "can-i", "create", "deployments.apps", "-n", namespace, *identity,
                                     check=False)
            return True if result.stdout.strip() == "yes" else None
        return attempt

    # The authorizer learns of a new RoleBinding asynchronously.
    for identity in (["--as=oncall@example.com"], ["--as=mallory@example.com"],
                     ["--as=bob@example.com", "--as-group=platform-oncall"]):
        gate_mod.eventually(can_create(*identity), timeout=30, interval=0.2, what=f"RBAC for {identity}")


def test_break_glass_is_honoured_only_for_permitted_people(gate_in_mode: GateInMode, cluster: Cluster,
                                                          kubectl_apply: Apply) -> None:
    solo = gate_in_mode("enforce")
    namespace = solo.namespace("e2e-oncall", environment="staging")
    grant_edit(cluster, namespace)

    # Without the annotation, enforce mode refuses the tag (the baseline the annotation overrides).
    plain = kubectl_apply(tagged_deployment("plain", namespace), args=("--as=oncall@example.com",))
    assert plain.returncode == 1
    assert plain.stderr == (f'Error from server (Forbidden): error when creating "{plain.path}": admission webhook '
                            f'"{WEBHOOK}" denied the request: {mutable_tag(namespace, "plain")}\n')

    # A permitted user, by name: admitted, and kubectl shows the break-glass line first.
    oncall = kubectl_apply(tagged_deployment("hotfix", namespace, "INC-1 outage"), args=("--as=oncall@example.com",))
    assert (oncall.returncode, oncall.stdout) == (0, "deployment.apps/hotfix created\n")
    note = f'[break-glass] Deployment {namespace}/hotfix admitted despite 1 finding(s) by "oncall@example.com": INC-1 outage'
    assert len(note) <= MAX_WARNING_CHARS  # shown whole, reason included (a longer one is cut like any warning)
    assert oncall.stderr == f"Warning: {note}\n" + TAG_WARNING

    # Anyone else: the annotation is ignored, and the denial says why.
    mallory = kubectl_apply(tagged_deployment("sneaky", namespace, "INC-1 outage"),
                            args=("--as=mallory@example.com",))
    assert mallory.returncode == 1
    assert mallory.stderr == (
        f'Error from server (Forbidden): error when creating "{mallory.path}": admission webhook "{WEBHOOK}" '
        f'denied the request: {mutable_tag(namespace, "sneaky")}\n'
        '[break-glass] annotation promotion-gate.io/break-glass ignored: user "mallory@example.com" is not '
        "allowed to break glass\n")
    assert cluster.kubectl("get", "deployment/sneaky", "-n", namespace, check=False).returncode == 1

    # A permitted group: admitted for whoever is in it.
    bob = kubectl_apply(tagged_deployment("rollback", namespace, "INC-1 outage"),
                        args=("--as=bob@example.com", "--as-group=platform-oncall"))
    assert (bob.returncode, bob.stdout) == (0, "deployment.apps/rollback created\n")
    assert bob.stderr == (f'Warning: [break-glass] Deployment {namespace}/rollback admitted despite 1 finding(s) by '
                          f'"bob@example.com": INC-1 outage\n{TAG_WARNING}')

    # Security teams find every use of break-glass in the decision log, with who, why and what.
    used = [(d["name"], d["user"], d["breakGlass"], d["reasons"]) for d in gate_mod.decisions(solo.server)
            if d["namespace"] == namespace and d["breakGlass"]]
    assert used == [("hotfix", "oncall@example.com", "INC-1 outage", ["mutable-tag", "break-glass"]),
                    ("rollback", "bob@example.com", "INC-1 outage", ["mutable-tag", "break-glass"])]
    [bob_decision] = gate_mod.decision_for(solo.server, namespace, "rollback")
    assert "platform-oncall" in bob_decision["groups"]


def test_an_annotation_on_the_deployment_does_not_mask_one_added_to_its_pod_template(
        gate_in_mode: GateInMode, cluster: Cluster, kubectl_apply: Apply) -> None:
    """The red-team case: break-glass on the Deployment, then an unprivileged edit of its Pod template."""
    solo = gate_in_mode("enforce")
    namespace = solo.namespace("e2e-masking", environment="staging")
    grant_edit(cluster, namespace)
    image = "ghcr.io/acme/payment-api@sha256:" + "a" * 64
    pinned = {"api": image}
    created = kubectl_apply(tagged_deployment("api", namespace, "INC-1 outage", images=pinned),
                            args=("--as=oncall@example.com",))
    assert created.returncode == 0, created.stderr
    template = {"spec": {"template": {"metadata": {"annotations": {BREAK_GLASS: "INC-1 outage"}}}}}
    patched = cluster.kubectl("patch", "deployment/api", "-n", namespace, "--type=merge", "-p",
                              json.dumps(template), "--as=mallory@example.com", check=False)
    assert patched.returncode == 1
    # Judged in full, as a new exception would be: the unpromoted digest is a finding, and mallory's
    # annotation does not excuse it.
    assert patched.stderr == (
        f'Error from server (Forbidden): admission webhook "{WEBHOOK}" denied the request: [not-promoted] '
        f'Deployment {namespace}/api spec.template.spec.containers[0] "api": {image} has no promotion record for '
        f'environment "staging" (promoted to: none). Promote it: promotion-gate promote {image} --to staging\n'
        f'[break-glass] annotation {BREAK_GLASS} ignored: user "mallory@example.com" is not allowed to break '
        "glass\n")
    still = cluster.kubectl("get", "deployment/api", "-n", namespace, "-o",
                            "jsonpath={.spec.template.metadata.annotations}")
    assert BREAK_GLASS not in still.stdout
    # The permitted person may do it.
    allowed = cluster.kubectl("patch", "deployment/api", "-n", namespace, "--type=merge", "-p",
                              json.dumps(template), "--as=oncall@example.com", check=False)
    assert allowed.returncode == 0, allowed.stderr
