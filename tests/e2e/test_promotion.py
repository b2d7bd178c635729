"""Promotion-gated admission through a real kube-apiserver: record, promote, revoke, relabel, debug.

A webhook server of this module's own (``tests/e2e/gate.py``: SoloGate) runs the promotion kit's policy
(ci -> staging -> production, production needs two signatures) on a real store — a SQLite file, and a
database on the real PostgreSQL server — and reads namespace labels through the API server. Records
are made the way a pipeline makes them: ``promotion-gate record/promote/revoke`` against the server's
HTTPS API with a bearer token. Verdicts are read from real clients: ``kubectl`` and the Python client.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import solo_gate
from tests.e2e.gate import Applied, Apply, SoloGate
from tools.promotion_kit import REPOSITORY, Kit, cli, make_kit
from tools.servers import PostgresServer

pytestmark = pytest.mark.e2e

WEBHOOK = gate_mod.WEBHOOK_NAME
ENVIRONMENT_LABEL = gate_mod.ENVIRONMENT_LABEL



@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("promotion-kit"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def promotion_gate(request: pytest.FixtureRequest, cluster: Cluster, core: Any, gate: gate_mod.Gate, kit: Kit,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoloGate]:
    """The kit's policy on one store backend; one gate per backend, never both at once."""
    directory = tmp_path_factory.mktemp(f"promotion-{request.param}")
    if request.param == "sqlite":
        store = f"sqlite:///{directory / 'store.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        store = postgres.create_database("e2e_" + uuid.uuid4().hex[:12])
    with solo_gate(cluster, core, request.config, directory / "webhook", release=f"e2e-promotion-{request.param}",
                   policy=kit.policy_path.read_text(), session_gate=gate, store=store,
                   extra=["--server-key", str(kit.key("ci"))]) as solo:
        yield solo


@pytest.fixture
def image(request: pytest.FixtureRequest) -> str:
    """A digest of this test's own: the store is shared by the module's tests, their records are not."""
    return f"{REPOSITORY}@sha256:{hashlib.sha256(request.node.nodeid.encode()).hexdigest()}"


# --- the pipeline's side: the CLI against the server's API --------------------------------------------


def remote(gate: SoloGate, kit: Kit, identity: str) -> list[str]:
    return ["--server", gate.server.url, "--token-file", str(kit.token_file(identity)),
            "--ca-file", str(gate.server.ca)]


def run_cli(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, f"promotion-gate {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def record_ci(gate: SoloGate, kit: Kit, image: str) -> None:
    stdout = run_cli("record", image, "--no-registry", "--env", "ci", "--git-commit", "4f2c9e1", "--git-repository",
                     "github.com/acme/payment-api", "--ci-run", "8812", "--tests-passed", "120", "--tests-failed", "0",
                     "--scanner", "trivy", "--scan-critical", "0", "--scan-high", "0", "--key", str(kit.key("ci")),
                     "--by", "ci-bot", *remote(gate, kit, "ci-bot"))
    assert stdout.startswith(f"{image} recorded for ci: record ")


def promote_to_staging(gate: SoloGate, kit: Kit, image: str) -> None:
    record_ci(gate, kit, image)
    run_cli("promote", image, "--to", "staging", "--key", str(kit.key("ci")), *remote(gate, kit, "ci-bot"))


def promote_to_production(gate: SoloGate, kit: Kit, image: str) -> None:
    promote_to_staging(gate, kit, image)
    run_cli("promote", image, "--to", "production", "--key", str(kit.key("release")), "--key",
            str(kit.key("approver-a")), "--approver", "alice", "--approver", "bob", "--reason", "CHG-1042",
            *remote(gate, kit, "release-bot"))


# --- what kubectl says ----------------------------------------------------------------------------------


def denied(path: Path, *lines: str) -> str:
    return (f'Error from server (Forbidden): error when creating "{path}": '
            f'admission webhook "{WEBHOOK}" denied the request: ' + "\n".join(lines) + "\n")


def not_promoted(subject: str, field: str, container: str, image: str, environment: str, promoted_to: str) -> str:
    return (f'[not-promoted] {subject} {field} "{container}": {image} has no promotion record for environment '
            f'"{environment}" (promoted to: {promoted_to}). Promote it: promotion-gate promote {image} '
            f"--to {environment}")


def test_a_digest_is_admitted_once_promoted_and_refused_once_revoked(
        promotion_gate: SoloGate, kit: Kit, kubectl_apply: Apply, image: str) -> None:
    namespace = promotion_gate.namespace("e2e-payments-prod", environment="production")
    api = manifests.pod("api", namespace, {"api": image})

    refused = kubectl_apply(api)
    assert refused.returncode == 1
    assert refused.stderr == denied(refused.path, not_promoted(f"Pod {namespace}/api", "spec.containers[0]", "api",
                                                               image, "production", "none"))

    promote_to_production(promotion_gate, kit, image)
    admitted = kubectl_apply(api)
    assert (admitted.returncode, admitted.stdout, admitted.stderr) == (0, "pod/api created\n", "")
    # The decision log ties the running Pod to the production record that let it in (chain of custody).
    [decision] = [d for d in gate_mod.decision_for(promotion_gate.server, namespace, "api") if d["allowed"]]
    assert (decision["environment"], decision["reasons"], len(decision["images"][0]["records"])) == (
        "production", [], 1)

    run_cli("revoke", image, "--env", "production", "--reason", "CVE-2026-0001", "--key", str(kit.key("release")),
            *remote(promotion_gate, kit, "release-bot"))
    again = kubectl_apply(manifests.pod("api-2", namespace, {"api": image}))
    assert again.returncode == 1
    assert again.stderr == denied(again.path, not_promoted(f"Pod {namespace}/api-2", "spec.containers[0]", "api",
                                                           image, "production",
                                                           "ci, staging; revoked from production"))


def test_relabelling_the_namespace_changes_the_verdict(promotion_gate: SoloGate, kit: Kit, cluster: Cluster,
                                                       kubectl_apply: Apply, image: str) -> None:
    promote_to_staging(promotion_gate, kit, image)
    namespace = promotion_gate.namespace("e2e-payments", environment="production")
    names = (f"api-{i}" for i in itertools.count())

    def relabel(environment: str | None) -> None:
        label = f"{ENVIRONMENT_LABEL}={environment}" if environment else f"{ENVIRONMENT_LABEL}-"
        cluster.kubectl("label", "namespace", namespace, label, "--overwrite")

    def until(accept: Callable[[Applied], bool], what: str) -> tuple[str, Applied]:
        # The server learns of a label through its namespace watch: retry briefly until it has.
        def attempt() -> tuple[str, Applied] | None:
            name = next(names)
            result = kubectl_apply(manifests.pod(name, namespace, {"api": image}))
            return (name, result) if accept(result) else None

        return gate_mod.eventually(attempt, timeout=30, interval=0.3, what=what)

    name, refused = until(lambda r: r.returncode == 1, "the first refusal")
    assert refused.stderr == denied(refused.path, not_promoted(f"Pod {namespace}/{name}", "spec.containers[0]", "api",
                                                               image, "production", "ci, staging"))

    relabel("staging")
    _, admitted = until(lambda r: r.returncode == 0, "the staging label to be honoured")
    assert admitted.stderr == ""

    relabel("production")
    name, refused = until(lambda r: r.returncode == 1, "the production label to be honoured")
    assert refused.stderr == denied(refused.path, not_promoted(f"Pod {namespace}/{name}", "spec.containers[0]", "api",
                                                               image, "production", "ci, staging"))

    relabel(None)  # no label and no static mapping: the kit's policy denies unmapped namespaces
    name, unmapped = until(lambda r: "[no-environment]" in r.stderr, "the removed label to be honoured")
    assert unmapped.stderr == denied(
        unmapped.path,
        f'[no-environment] Pod {namespace}/{name}: namespace "{namespace}" has no environment; label it: '
        f"kubectl label namespace {namespace} {ENVIRONMENT_LABEL}=<ci|staging|production>")


# --- kubectl debug: pods/ephemeralcontainers in a staging namespace --------------------------------------


def ephemeral_images(core: Any, namespace: str, pod: str) -> list[str]:
    spec = core.read_namespaced_pod(pod, namespace).spec
    return [c.image for c in spec.ephemeral_containers or []]


def test_kubectl_debug_admits_a_promoted_digest_and_refuses_a_tag(promotion_gate: SoloGate, kit: Kit,
                                                                  cluster: Cluster, core: Any, image: str) -> None:
    promote_to_staging(promotion_gate, kit, image)
    namespace = promotion_gate.namespace("e2e-payments-staging", environment="staging")
    core.create_namespaced_pod(namespace, manifests.pod("api", namespace, {"api": image}))

    def debug(debug_image: str, container: str) -> Any:
        return cluster.kubectl("debug", "api", "-n", namespace, f"--image={debug_image}", "--profile=general",
                               f"--container={container}", check=False)

    allowed = debug(image, "debugger")
    assert (allowed.returncode, allowed.stderr) == (0, "")
    assert ephemeral_images(core, namespace, "api") == [image]

    tagged = debug("busybox:1.36", "shell")
    assert tagged.returncode == 1
    assert tagged.stderr == (
        f'Error from server (Forbidden): admission webhook "{WEBHOOK}" denied the request: [mutable-tag] Pod '
        f'{namespace}/api spec.ephemeralContainers[1] "shell": image "busybox:1.36" is a mutable tag; deploy by '
        "digest: busybox@sha256:<digest>\n")

    unpromoted = f"{REPOSITORY}@sha256:{'e' * 64}"
    refused = debug(unpromoted, "other")
    assert refused.returncode == 1
    assert refused.stderr == (
        f'Error from server (Forbidden): admission webhook "{WEBHOOK}" denied the request: '
        + not_promoted(f"Pod {namespace}/api", "spec.ephemeralContainers[1]", "other", unpromoted, "staging", "none")
        + "\n")
    assert ephemeral_images(core, namespace, "api") == [image]
