"""What operators install is accepted by a real kube-apiserver: manifests/, the chart, the Promotion CRD.

Every object goes through ``kubectl apply --dry-run=server``: the API server decodes it with strict
field validation, defaults it, validates it, runs admission (Pod Security included) and stores
nothing. Only the CRD is applied for real (custom objects and dry-runs of later objects need it), and
the release namespace ``promotion-gate`` is created as a plain namespace; see ``release_namespace``.
The ValidatingWebhookConfiguration of the manifests (``failurePolicy: Fail``, a Service with no
endpoints) is never persisted: it would refuse every Pod of every other test.

Kinds whose CRD the cluster does not serve (cert-manager's Issuer and Certificate in
``certificates.mode=certManager``, the Prometheus operator's ServiceMonitor) cannot be dry-run; they
are left out of the apply and the test asserts that nothing else was left out.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.chart.helm import server_key_values
from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tools.servers import REPO
from webhook import certs

pytestmark = pytest.mark.e2e

MANIFESTS = REPO / "manifests"
MANIFEST_FILES = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
CRD_FILE = MANIFESTS / "01-crd.yaml"
CRD_NAME = "promotions.promotion-gate.io"
RELEASE, RELEASE_NAMESPACE = gate_mod.RELEASE, gate_mod.RELEASE_NAMESPACE
# Groups of CRDs the chart may render objects of but does not install: skipped when not served.
OPTIONAL_GROUPS = frozenset({"cert-manager.io", "monitoring.coreos.com"})
DIGEST = "sha256:" + "0123456789abcdef" * 4
DRY_RUN_LINE = re.compile(r"^(?P<resource>\S+)/(?P<name>\S+) (?P<verb>created|configured|unchanged) "
                          r"\(server dry run\)$")

Document = dict[str, Any]
# kubectl's own note (not the API server's) when it applies onto the plain release namespace, which
# was created without `kubectl apply` (see release_namespace).
PLAIN_NAMESPACE_NOTE = (
    f"Warning: resource namespaces/{RELEASE_NAMESPACE} is missing the kubectl.kubernetes.io/last-applied-configuration "
    "annotation which is required by kubectl apply. kubectl apply should only be used on resources created "
    "declaratively by either kubectl create --save-config or kubectl apply. The missing annotation will be patched "
    "automatically.\n")


@pytest.fixture(scope="module")
def promotion_crd(cluster: Cluster) -> None:
    """The CRD of manifests/, for real (the same object the chart's crds/ installs)."""
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", f"customresourcedefinition/{CRD_NAME}", "--timeout=60s")


@pytest.fixture(scope="module")
def release_namespace(cluster: Cluster, promotion_crd: None) -> str:
    """The namespace the manifests' namespaced objects live in, so they can be dry-run into it.

    Created plain, the way test_digest_only creates it, not from 00-namespace.yaml: that Namespace
    enforces Pod Security ``restricted``, which would refuse the unhardened Pod that test_digest_only
    creates in this namespace when it runs later in the session. The Namespace object itself is
    dry-run like every other, and its labels are enforced for real on a namespace of this module's own
    (test_the_chart_pods_pass_pod_security_restricted).
    """
    cluster.kubectl("create", "namespace", RELEASE_NAMESPACE, check=False)
    return RELEASE_NAMESPACE


@pytest.fixture(scope="module")
def served(cluster: Cluster, promotion_crd: None) -> frozenset[tuple[str, str]]:
    """(apiVersion, kind) of everything the API server serves (``kubectl api-resources``)."""
    listing = cluster.kubectl("api-resources", "--no-headers").stdout
    # Columns: NAME [SHORTNAMES] APIVERSION NAMESPACED KIND; SHORTNAMES may be empty.
    return frozenset((fields[-3], fields[-1]) for fields in (line.split() for line in listing.splitlines()) if fields)


def load(path: Path) -> list[Document]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def group_of(document: Document) -> str:
    api_version: str = document["apiVersion"]
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def kubectl_name(document: Document) -> str:
    """How kubectl names an object in its output: ``deployment.apps/promotion-gate``."""
    group = group_of(document)
    return f"{document['kind'].lower()}{'.' + group if group else ''}/{document['metadata']['name']}"


@dataclass(frozen=True)
class DryRun:
    stderr: str
    accepted: list[str]  # kubectl names, in kubectl's order
    skipped: list[str]  # objects of kinds the cluster does not serve


def dry_run(cluster: Cluster, path: Path, documents: Sequence[Document], served: frozenset[tuple[str, str]],
            *, write: bool = True) -> DryRun:
    """``kubectl apply --dry-run=server -f path``, of the served documents only (rewriting ``path``)."""
    applied = [d for d in documents if (d["apiVersion"], d["kind"]) in served]
    skipped = [kubectl_name(d) for d in documents if (d["apiVersion"], d["kind"]) not in served]
    if write:
        path.write_text(manifests.to_yaml(*applied))
    result = cluster.kubectl("apply", "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode == 0, f"kubectl apply --dry-run=server -f {path}:\n{result.stderr}"
    stderr = result.stderr.replace(PLAIN_NAMESPACE_NOTE, "")
    accepted = []
    for line in result.stdout.splitlines():
        match = DRY_RUN_LINE.match(line)
        assert match, f"unexpected kubectl output line: {line!r}"
        accepted.append(f"{match['resource']}/{match['name']}")
    assert accepted == [kubectl_name(d) for d in applied]
    return DryRun(stderr, accepted, skipped)


# --- manifests/ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=[p.name for p in MANIFEST_FILES])
def test_every_plain_manifest_passes_server_side_dry_run(cluster: Cluster, release_namespace: str,
                                                         served: frozenset[tuple[str, str]], tmp_path: Path,
                                                         path: Path) -> None:
    documents = load(path)
    if all((d["apiVersion"], d["kind"]) in served for d in documents):
        result = dry_run(cluster, path, documents, served, write=False)  # the file itself, as operators apply it
    else:
        result = dry_run(cluster, tmp_path / path.name, documents, served)
    assert result.stderr == ""  # no warnings: nothing deprecated, no unknown field, no Pod Security finding
    assert len(result.accepted) + len(result.skipped) == len(documents)


def test_the_kustomization_passes_server_side_dry_run(cluster: Cluster, release_namespace: str) -> None:
    # `kubectl apply -k manifests/` is the documented install (manifests/README.md).
    result = cluster.kubectl("apply", "-k", str(MANIFESTS), "--dry-run=server", check=False)
    assert (result.returncode, result.stderr.replace(PLAIN_NAMESPACE_NOTE, "")) == (0, "")
    expected = sorted(kubectl_name(d) for path in MANIFEST_FILES for d in load(path))
    accepted = sorted(m["resource"] + "/" + m["name"] for m in map(DRY_RUN_LINE.match, result.stdout.splitlines())
                      if m is not None)
    assert accepted == expected, result.stdout


# --- helm template ----------------------------------------------------------------------------------


def provided_ca_bundle() -> str:
    ca_pem, _ = certs.new_ca("promotion-gate e2e provided CA")
    return base64.b64encode(ca_pem).decode()


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sqlite-single-replica": {"store.type": "sqlite", "replicaCount": 1},
    "cert-manager": {"certificates.mode": "certManager"},
    "provided-certificate": {"certificates.mode": "provided", "certificates.provided.secretName": "promotion-gate-tls",
                             "certificates.provided.caBundle": provided_ca_bundle()},
    "opt-in": {"webhook.namespaceSelector.mode": "optIn"},
    "fail-open": {"webhook.failurePolicy": "Ignore"},
    "everything-on": {"image.digest": DIGEST, "apiTokens.enabled": True,
                      "apiTokens.tokens": [{"identity": "ci", "sha256": "a" * 64, "environments": ["ci"]}],
                      **server_key_values("promotion-gate-server-key"), "metrics.serviceMonitor.enabled": True},
}
# What each variant renders that this cluster cannot dry-run (no cert-manager, no Prometheus operator).
UNSERVED = {
    "cert-manager": ["issuer.cert-manager.io/promotion-gate-selfsigned", "certificate.cert-manager.io/promotion-gate-ca",
                     "issuer.cert-manager.io/promotion-gate-ca", "certificate.cert-manager.io/promotion-gate-serving"],
    "everything-on": ["servicemonitor.monitoring.coreos.com/promotion-gate",
                      "servicemonitor.monitoring.coreos.com/promotion-gate-operator"],
}


def helm_template(cluster: Cluster, values: dict[str, Any], *, namespace: str = RELEASE_NAMESPACE,
                  extra: Sequence[str] = ("--skip-tests",)) -> list[Document]:
    args = ["template", RELEASE, str(gate_mod.CHART), "--namespace", namespace, "--include-crds", *extra]
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    if cluster.server_version:
        args += ["--kube-version", cluster.server_version]
    return [d for d in yaml.safe_load_all(cluster.helm(*args).stdout) if d]


@pytest.mark.parametrize("values", list(VARIANTS.values()), ids=list(VARIANTS))
def test_every_chart_object_passes_server_side_dry_run(cluster: Cluster, release_namespace: str,
                                                       served: frozenset[tuple[str, str]], tmp_path: Path,
                                                       request: pytest.FixtureRequest, values: dict[str, Any]) -> None:
    variant = request.node.callspec.id
    documents = helm_template(cluster, values)
    result = dry_run(cluster, tmp_path / "rendered.yaml", documents, served)
    assert result.stderr == ""
    # Left out only when their CRD is absent (a cluster with cert-manager dry-runs them too).
    served_groups = {group_of({"apiVersion": api_version}) for api_version, _ in served}
    unserved = [name for name in UNSERVED.get(variant, []) if name.split("/")[0].split(".", 1)[1] not in served_groups]
    assert sorted(result.skipped) == sorted(unserved)
    assert {"deployment.apps/promotion-gate", f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}",
            "customresourcedefinition.apiextensions.k8s.io/policyreports.wgpolicyk8s.io",
            "validatingwebhookconfiguration.admissionregistration.k8s.io/promotion-gate"} <= set(result.accepted)


@pytest.mark.parametrize("values", [{}, {"store.type": "sqlite", "replicaCount": 1}], ids=["defaults", "sqlite"])
def test_the_chart_pods_pass_pod_security_restricted(cluster: Cluster, core: Any, promotion_crd: None,
                                                    served: frozenset[tuple[str, str]], tmp_path: Path,
                                                    values: dict[str, Any]) -> None:
    # The Namespace of manifests/ (Pod Security enforce and warn: restricted), under a name of our own.
    [namespace_document] = load(MANIFESTS / "00-namespace.yaml")
    labelled = copy.deepcopy(namespace_document)
    labelled["metadata"]["name"] = namespace = gate_mod.unique_name("e2e-pod-security")
    cluster.kubectl("apply", "-f", "-", input=manifests.to_yaml(labelled))
    assert core.read_namespace(namespace).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # With the helm test Pod (a bare Pod: refused outright if it broke the profile), and images by
    # digest, so that a digest-only gate judging this namespace admits them: Pod Security is under test.
    documents = helm_template(cluster, {**values, "image.digest": DIGEST}, namespace=namespace, extra=())
    assert any(d["kind"] == "Pod" for d in documents)
    result = dry_run(cluster, tmp_path / "rendered.yaml", documents, served)
    # A Deployment breaking the profile is admitted with "Warning: would violate PodSecurity ...".
    assert result.stderr == ""


# --- the Promotion CRD --------------------------------------------------------------------------------

PINNED_IMAGE = manifests.PINNED
PATTERN = r"'^[^\s@]+@(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$'"


def promotion(name: str, namespace: str, **spec: Any) -> Document:
    return {"apiVersion": "promotion-gate.io/v1", "kind": "Promotion",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_a_valid_promotion_is_created(cluster: Cluster, api_client: Any, promotion_crd: None, namespace: str,
                                      tmp_path: Path) -> None:
    from kubernetes import client

    document = promotion("api-production", namespace, image=PINNED_IMAGE, environment="production",
                         evidence={"gitCommit": "4f2c9e1", "testsPassed": 120, "testsFailed": 0,
                                   "scan": {"scanner": "trivy", "critical": 0, "high": 0},
                                   "approvers": ["alice", "bob"], "reason": "CHG-1042"})
    result = gate_mod.apply_file(cluster, tmp_path / "promotion.yaml", document)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "promotion.promotion-gate.io/api-production created\n", "")
    stored: Any = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "promotion-gate.io", "v1", namespace, "promotions", "api-production")
    assert stored["spec"] == document["spec"]
    listed = cluster.kubectl("get", "promotions", "-n", namespace).stdout.split("\n")[1].split()
    assert listed[:3] == ["api-production", PINNED_IMAGE, "production"]


INVALID = {
    "tag": ({"image": manifests.TAGGED, "environment": "production"},
            f'spec.image: Invalid value: "{manifests.TAGGED}": spec.image in body should match {PATTERN}'),
    "tag-and-short-digest": ({"image": "ghcr.io/acme/payment-api@sha256:f8a2", "environment": "production"},
                             'spec.image: Invalid value: "ghcr.io/acme/payment-api@sha256:f8a2": spec.image in body '
                             f"should match {PATTERN}"),
    "environment-name": ({"image": PINNED_IMAGE, "environment": "Production"},
                         'spec.environment: Invalid value: "Production": spec.environment in body should match '
                         "'^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'"),
    "no-environment": ({"image": PINNED_IMAGE}, "spec.environment: Required value"),
}


@pytest.mark.parametrize(("spec", "message"), list(INVALID.values()), ids=list(INVALID))
def test_an_invalid_promotion_is_refused_by_the_crd_schema(cluster: Cluster, promotion_crd: None, namespace: str,
                                                           tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    result = gate_mod.apply_file(cluster, tmp_path / "promotion.yaml", promotion("bad", namespace, **spec))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f'The Promotion "bad" is invalid: {message}\n'
    assert cluster.kubectl("get", "promotion/bad", "-n", namespace, check=False).returncode == 1


def test_the_python_client_gets_a_422_naming_the_field(api_client: Any, promotion_crd: None, namespace: str) -> None:
    from kubernetes import client

    with pytest.raises(ApiException) as raised:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            "promotion-gate.io", "v1", namespace, "promotions",
            promotion("bad", namespace, image=manifests.TAGGED, environment="production"))
    status = json.loads(raised.value.body or "{}")
    assert (raised.value.status, status["reason"]) == (422, "Invalid")
    assert [(c["field"], c["reason"]) for c in status["details"]["causes"]] == [("spec.image", "FieldValueInvalid")]


# --- and afterwards ------------------------------------------------------------------------------


def test_dry_runs_persist_nothing(cluster: Cluster, release_namespace: str) -> None:
    if cluster.kind != "local":
        pytest.skip("against kind the chart is installed for real in the release namespace")
    # Every dry-run above left the cluster as it was; above all, no webhook configuration of the
    # manifests' (failurePolicy Fail, a Service without endpoints) that would refuse every Pod of every
    # other test. The session gate's registration has the same name but calls a URL.
    configurations = json.loads(cluster.kubectl("get", "validatingwebhookconfigurations", "-o", "json").stdout)
    services = [(item["metadata"]["name"], webhook["clientConfig"]["service"]) for item in configurations["items"]
                for webhook in item["webhooks"] if "service" in webhook["clientConfig"]]
    assert [(name, s["namespace"], s["name"]) for name, s in services
            if s["namespace"] == RELEASE_NAMESPACE] == []
    for kind, name in [("clusterrole", "promotion-gate-webhook"), ("deployment", "promotion-gate"),
                       ("serviceaccount", "promotion-gate")]:
        found = cluster.kubectl("get", kind, name, "-n", RELEASE_NAMESPACE, check=False)
        assert found.returncode == 1 and "NotFound" in found.stderr, f"{kind}/{name} exists"
