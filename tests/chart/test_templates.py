"""What `helm template` renders for each combination of values, read as tables of cases."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tests.chart.helm import (
    DIGEST,
    NAMESPACE,
    Rendered,
    render,
    render_error,
    render_notes,
    run_helm,
    server_key_values,
)
from tests.chart.k8s_models import structural_errors
from tools.render_manifests import CHART
from webhook import cli as cli_mod
from webhook import policy_file as policy_mod
from webhook.core.policy import Mode

CA_BUNDLE = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
SQLITE = {"store.type": "sqlite", "replicaCount": 1}
CERT_MANAGER = {"certificates.mode": "certManager"}
PROVIDED = {
    "certificates.mode": "provided",
    "certificates.provided.secretName": "my-tls",
    "certificates.provided.caBundle": CA_BUNDLE,
}
URL = {"webhook.url": "https://127.0.0.1:9443/validate", "webhook.caBundle": CA_BUNDLE}
# The server key signs audit checkpoints; the policy names its public key, and the operator anchors the log.
SERVER_KEY = server_key_values()
SERVER_PUBLIC_KEY = SERVER_KEY["policy.keys"]["server"]["publicKey"]
CLIENT_CA = {"server.validateClientCA.enabled": True, "server.validateClientCA.configMap": "apiserver-client-ca",
             "server.validateClientCA.allowedNames": ["kube-apiserver"]}
NETWORK_POLICY = {"networkPolicy.enabled": True, "networkPolicy.apiServer.cidrs": ["10.0.0.10/32"]}

# Value sets every object-level check runs against.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sqlite": SQLITE,
    "cert-manager": CERT_MANAGER,
    "provided": PROVIDED,
    "url": URL,
    "operator-disabled": {"operator.enabled": False, **CERT_MANAGER},
    "everything-on": {
        "image.digest": DIGEST,
        "apiTokens.enabled": True,
        "apiTokens.tokens": [{"identity": "ci", "sha256": "a" * 64}],
        **SERVER_KEY,
        "metrics.serviceMonitor.enabled": True,
        "webhook.namespaceSelector.mode": "optIn",
        "priorityClassName": "high",
        **CLIENT_CA,
        **NETWORK_POLICY,
    },
}


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


# --- every object, every scenario -----------------------------------------------------------------


@pytest.mark.parametrize("values", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_every_object_fits_its_kubernetes_api_type(values: dict[str, Any]) -> None:
    rendered = render(values)
    errors = [e for obj in rendered.objects for e in structural_errors(obj)]
    assert errors == []


@pytest.mark.parametrize("values", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_every_object_carries_the_standard_labels(values: dict[str, Any]) -> None:
    for obj in render(values).objects:
        labels = obj["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks label {key}"


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("values", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_every_pod_passes_pod_security_restricted(values: dict[str, Any]) -> None:
    pods = list(render(values).pod_specs())
    assert len(pods) >= 2
    for where, spec in pods:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{where}: volume {volume['name']} is {kinds}"
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            label = f"{where} container {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["runAsNonRoot"] is True, label
            assert sc["capabilities"] == {"drop": ["ALL"]}, label
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, label
            assert not sc.get("privileged"), label
            assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]], label
            assert "limits" in container["resources"] and "requests" in container["resources"], label


# --- the webhook Deployment -----------------------------------------------------------------------


def test_webhook_deployment_defaults(default: Rendered) -> None:
    deployment = default.deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    container = default.container()
    assert container["command"] == ["promotion-gate"]
    assert container["args"] == [
        "serve",
        "--bind",
        "0.0.0.0:8443",
        "--cert-dir",
        "/etc/promotion-gate/tls",
        "--policy",
        "/etc/promotion-gate/policy/policy.yaml",
        "--workers",
        "1",
        "--threads",
        "8",
        "--max-connections",
        "1024",
        "--max-connections-per-address",
        "256",
        "--body-memory",
        "64",
        "--handshake-timeout",
        "5",
        "--header-timeout",
        "5",
        "--body-timeout",
        "10",
        "--keepalive-timeout",
        "75",
    ]
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    pod = spec["template"]["spec"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert "priorityClassName" not in pod


def test_service_maps_443_to_the_https_port(default: Rendered) -> None:
    service = default.one("Service", "promotion-gate")
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    assert service["spec"]["selector"] == default.deployment()["spec"]["selector"]["matchLabels"]


def test_serve_arguments_and_environment_exist_in_the_cli(default: Rendered) -> None:
    # The chart and `promotion-gate serve` must agree on every option and environment variable.
    serve = cli_mod.main.commands["serve"]
    options = {opt for param in serve.params if isinstance(param, click.Option) for opt in param.opts}
    rendered = render({**SERVER_KEY, **SQLITE, **CLIENT_CA})
    for args in (default.container()["args"], rendered.container()["args"]):
        assert {a for a in args if a.startswith("--")} <= options
    envvars = {param.envvar for param in serve.params if isinstance(param, click.Option)}
    assert {"PROMOTION_GATE_STORE", "PROMOTION_GATE_SERVER_KEY"} <= envvars


def test_operator_arguments_and_environment_exist_in_the_cli(default: Rendered) -> None:
    # The chart and `promotion-gate operator` must agree on every option and environment variable.
    operator = cli_mod.main.commands["operator"]
    options = {opt for param in operator.params if isinstance(param, click.Option) for opt in param.opts}
    for rendered in (default, render(SERVER_KEY)):
        container = rendered.deployment("operator")["spec"]["template"]["spec"]["containers"][0]
        args = [*container.get("command", []), *container.get("args", [])]
        assert "operator" in args
        assert {a for a in args if a.startswith("--")} <= options
    envvars = {param.envvar for param in operator.params if isinstance(param, click.Option)}
    assert {e["name"] for e in container.get("env", []) if e["name"].startswith("PROMOTION_GATE_")} <= envvars


def test_priority_class_is_configurable() -> None:
    rendered = render({"priorityClassName": "system-cluster-critical"})
    for component in ("webhook", "operator"):
        assert (
            rendered.deployment(component)["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
        )


@pytest.mark.parametrize(("replicas", "has_pdb"), [(1, False), (2, True), (3, True)])
def test_pod_disruption_budget_only_with_several_replicas(replicas: int, has_pdb: bool) -> None:
    rendered = render({"replicaCount": replicas})
    budgets = rendered.of_kind("PodDisruptionBudget")
    assert bool(budgets) is has_pdb
    if has_pdb:
        assert budgets[0]["spec"]["minAvailable"] == 1
        assert budgets[0]["spec"]["selector"] == rendered.deployment()["spec"]["selector"]


# --- store ----------------------------------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


STORE_CASES: dict[str, tuple[dict[str, Any], dict[str, str] | None, str | None]] = {
    # values, expected secretKeyRef (PostgreSQL), expected --store argument (SQLite)
    "postgresql, default existing secret": ({}, {"name": "promotion-gate-store", "key": "dsn"}, None),
    "postgresql, named existing secret": (
        {"store.postgresql.existingSecret": "db", "store.postgresql.secretKey": "url"},
        {"name": "db", "key": "url"},
        None,
    ),
    "postgresql, DSN in values": (
        {"store.postgresql.existingSecret": "", "store.postgresql.dsn": "postgresql://u:p@db/pg"},
        {"name": "promotion-gate-store", "key": "dsn"},
        None,
    ),
    "sqlite": (SQLITE, None, "sqlite:////var/lib/promotion-gate/promotion-gate.db"),
}


@pytest.mark.parametrize(("values", "secret_ref", "store_arg"), list(STORE_CASES.values()), ids=list(STORE_CASES))
def test_store_configuration(values: dict[str, Any], secret_ref: dict[str, str] | None, store_arg: str | None) -> None:
    rendered = render(values)
    for component in ("webhook", "operator"):
        container = rendered.container(component)
        env, args = _env(container), container["args"]
        if secret_ref is not None:
            # The DSN never appears in the pod spec or the arguments, only through the Secret.
            assert env["PROMOTION_GATE_STORE"] == {"secretKeyRef": secret_ref}
            assert "--store" not in args
        else:
            assert "PROMOTION_GATE_STORE" not in env
            assert args[args.index("--store") + 1] == store_arg
            assert {"name": "data", "mountPath": "/var/lib/promotion-gate"} in container["volumeMounts"]
    claims = rendered.of_kind("PersistentVolumeClaim")
    assert bool(claims) is (store_arg is not None)
    if claims:
        assert claims[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert rendered.deployment()["spec"]["strategy"] == {"type": "Recreate"}
        operator_affinity = rendered.deployment("operator")["spec"]["template"]["spec"]["affinity"]
        term = operator_affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "webhook"
    created = [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == "promotion-gate-store"]
    assert bool(created) is ("store.postgresql.dsn" in values)


def test_sqlite_with_two_replicas_is_refused() -> None:
    error = render_error({"store.type": "sqlite", "replicaCount": 2})
    assert (
        "store.type=sqlite supports a single replica (replicaCount=2 given): SQLite is one file on one "
        "volume. Use store.type=postgresql for several replicas, or set replicaCount=1."
    ) in error


REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "postgresql without a DSN": (
        {"store.postgresql.existingSecret": ""},
        "store.type=postgresql needs store.postgresql.existingSecret (a Secret holding the DSN under "
        "store.postgresql.secretKey) or store.postgresql.dsn.",
    ),
    "provided without caBundle": (
        {"certificates.mode": "provided", "certificates.provided.secretName": "my-tls"},
        "certificates.mode=provided needs certificates.provided.caBundle: the base64-encoded PEM of the CA "
        "that signed the serving certificate in certificates.provided.secretName (the API server uses it to "
        "trust the webhook).",
    ),
    "provided without secret": (
        {"certificates.mode": "provided", "certificates.provided.caBundle": CA_BUNDLE},
        "certificates.mode=provided needs certificates.provided.secretName",
    ),
    "operator certificates without the operator": (
        {"operator.enabled": False},
        "certificates.mode=operator needs operator.enabled=true",
    ),
    "operator without signing key": (
        {"operator.signingKey.existingSecret": ""},
        "operator.enabled=true needs operator.signingKey.existingSecret",
    ),
    "server key without secret": (
        {"serverKey.enabled": True},
        "serverKey.enabled=true needs serverKey.existingSecret",
    ),
    "API tokens without tokens": ({"apiTokens.enabled": True}, "apiTokens.enabled=true needs"),
    "audit anchor without checkpoint keys": (
        {"serverKey.enabled": True, "serverKey.existingSecret": "k"},
        "the operator keeps an anchor of the audit log (operator.enabled, serverKey.enabled, auditAnchor.enabled): "
        "name the server key's public key under policy.audit.checkpointKeys (and list it under policy.keys), or set "
        "auditAnchor.enabled=false.",
    ),
    "checkpoint keys without the server key": (
        {"policy.keys": SERVER_KEY["policy.keys"], "policy.audit": SERVER_KEY["policy.audit"]},
        "policy.audit.checkpointKeys promises signed audit checkpoints: set serverKey.enabled=true with "
        "serverKey.existingSecret (the private key of one of them).",
    ),
    "client CA without its ConfigMap": (
        {"server.validateClientCA.enabled": True},
        "server.validateClientCA.configMap is required when server.validateClientCA.enabled",
    ),
    "network policy that names no API server": (
        {"networkPolicy.enabled": True},
        "networkPolicy.enabled needs networkPolicy.apiServer.cidrs or networkPolicy.apiServer.namespaceSelector "
        "(where the API server connects from): a policy without them cuts the API server off, and with "
        "failurePolicy Fail every workload change is denied",
    ),
}


@pytest.mark.parametrize(("values", "message"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_impossible_combinations_are_refused_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


# --- policy ---------------------------------------------------------------------------------------


def _policy(rendered: Rendered, tmp_path: Path) -> policy_mod.Policy:
    text = rendered.one("ConfigMap", "promotion-gate-policy")["data"]["policy.yaml"]
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return policy_mod.load(path)  # the server's own loader and schema


def test_default_policy_loads_with_the_servers_loader(default: Rendered, tmp_path: Path) -> None:
    policy = _policy(default, tmp_path)
    assert policy.environment_names == ("ci", "staging", "production")
    assert policy.default_mode == Mode.ENFORCE
    assert policy.unmapped == "deny"
    assert {"promotion-gate", "kube-system", "kube-public", "kube-node-lease"} <= policy.exempt_namespaces


def test_release_namespace_is_filled_in_unless_given(tmp_path: Path) -> None:
    assert "gatekeeping" in _policy(render(namespace="gatekeeping"), tmp_path).exempt_namespaces
    explicit = render({"policy.namespaces.releaseNamespace": "elsewhere"}, namespace="gatekeeping")
    assert "elsewhere" in _policy(explicit, tmp_path).exempt_namespaces


def test_policy_is_written_verbatim(tmp_path: Path) -> None:
    rendered = render(
        {
            "policy.defaultMode": "audit",
            "policy.environments": [{"name": "dev", "mode": "warn"}],
            "policy.exemptImages": [{"repository": "registry.k8s.io/pause", "reason": "infra"}],
        }
    )
    document = yaml.safe_load(rendered.one("ConfigMap")["data"]["policy.yaml"])
    assert document["defaultMode"] == "audit"
    assert document["environments"] == [{"name": "dev", "mode": "warn"}]
    assert document["exemptImages"] == [{"repository": "registry.k8s.io/pause", "reason": "infra"}]
    assert _policy(rendered, tmp_path).environment("dev") is not None


def test_a_policy_change_rolls_the_deployment(default: Rendered) -> None:
    def checksum(rendered: Rendered) -> str:
        return str(rendered.deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/policy"])

    assert checksum(default) == checksum(render())
    assert checksum(default) != checksum(render({"policy.defaultMode": "warn"}))


def test_api_tokens_file_is_mounted_and_referenced_from_the_policy(tmp_path: Path) -> None:
    for values, secret, key in (
        (
            {"apiTokens.tokens": [{"identity": "ci", "sha256": "a" * 64, "environments": ["ci"]}]},
            "promotion-gate-api-tokens",
            "tokens.yaml",
        ),
        ({"apiTokens.existingSecret": "tokens", "apiTokens.secretKey": "list.yaml"}, "tokens", "list.yaml"),
    ):
        rendered = render({"apiTokens.enabled": True, **values})
        document = yaml.safe_load(rendered.one("ConfigMap")["data"]["policy.yaml"])
        assert document["api"]["tokensFile"] == "/etc/promotion-gate/api-tokens/tokens.yaml"
        pod = rendered.deployment()["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "api-tokens")
        assert volume["secret"]["secretName"] == secret
        assert volume["secret"]["items"] == [{"key": key, "path": "tokens.yaml"}]
        assert {"name": "api-tokens", "mountPath": "/etc/promotion-gate/api-tokens", "readOnly": True} in pod[
            "containers"
        ][0]["volumeMounts"]
    created = render({"apiTokens.enabled": True, "apiTokens.tokens": [{"identity": "ci", "sha256": "a" * 64}]})
    secret_data = created.one("Secret", "promotion-gate-api-tokens")["stringData"]["tokens.yaml"]
    path = tmp_path / "tokens.yaml"
    path.write_text(secret_data)
    policy_path = tmp_path / "p.yaml"
    policy_path.write_text(f"apiVersion: promotion-gate.io/v1\nkind: Policy\napi:\n  tokensFile: {path}\n")
    assert [t.identity for t in policy_mod.load(policy_path).api_tokens] == ["ci"]


def test_server_key_comes_from_a_secret() -> None:
    rendered = render({**SERVER_KEY, "serverKey.existingSecret": "audit-key", "serverKey.secretKey": "ed25519.pem"})
    container = rendered.container()
    assert _env(container)["PROMOTION_GATE_SERVER_KEY"] == "/etc/promotion-gate/server-key/key.pem"
    volume = next(v for v in rendered.deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "server-key")
    assert volume["secret"]["secretName"] == "audit-key"
    assert volume["secret"]["items"] == [{"key": "ed25519.pem", "path": "key.pem"}]
    assert "PROMOTION_GATE_SERVER_KEY" not in _env(render().container())


# --- image ----------------------------------------------------------------------------------------

IMAGE_CASES: dict[str, tuple[dict[str, Any], str, bool]] = {
    # values, expected image of every container, NOTES warns about a tag
    "tag defaults to appVersion": ({}, "ghcr.io/promotion-gate/promotion-gate:0.1.0", True),
    "explicit tag": ({"image.tag": "0.1.0-rc1"}, "ghcr.io/promotion-gate/promotion-gate:0.1.0-rc1", True),
    "digest": ({"image.digest": DIGEST}, f"ghcr.io/promotion-gate/promotion-gate@{DIGEST}", False),
    "digest wins over tag": (
        {"image.digest": DIGEST, "image.tag": "x", "image.repository": "r.example/pg"},
        f"r.example/pg@{DIGEST}",
        False,
    ),
}


@pytest.mark.parametrize(("values", "image", "warns"), list(IMAGE_CASES.values()), ids=list(IMAGE_CASES))
def test_image_by_digest_or_tag(values: dict[str, Any], image: str, warns: bool, tmp_path: Path) -> None:
    rendered = render(values)
    images = {c["image"] for _, spec in rendered.pod_specs() for c in spec["containers"]}
    assert images == {image}  # webhook, operator and the helm test pod
    notes = render_notes(values, tmp_path)
    assert ("WARNING: the image is referenced by tag" in notes) is warns


def test_notes_tell_the_operator_what_to_do_next(tmp_path: Path) -> None:
    notes = render_notes({"image.digest": DIGEST}, tmp_path)
    for line in (
        "kubectl -n promotion-gate rollout status deployment/promotion-gate",
        "helm test promotion-gate -n promotion-gate",
        "kubectl label namespace <namespace> promotion-gate.io/environment=<environment>",
        "audit   - everything is admitted",
        "warn    - still admitted",
        "enforce - workloads with tags or unpromoted digests are denied",
        "kubectl delete validatingwebhookconfiguration promotion-gate",
        "kubectl get policyreport -A",
        "kubectl get events -A --field-selector reason=DigestRevoked",
    ):
        assert line in notes
    assert "kubectl get policyreport" not in render_notes({"operator.scan.enabled": False}, tmp_path / "no-scan")
    opt_in = render_notes({"webhook.namespaceSelector.mode": "optIn"}, tmp_path / "opt-in")
    assert "kubectl label namespace <namespace> promotion-gate.io/enforce=true" in opt_in


# --- the ValidatingWebhookConfiguration -----------------------------------------------------------


def test_webhook_configuration_defaults(default: Rendered) -> None:
    webhook = default.webhook
    assert default.webhook_config["metadata"]["name"] == "promotion-gate"
    assert webhook["name"] == "validate.promotion-gate.io"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["matchPolicy"] == "Equivalent"
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["timeoutSeconds"] == 10
    assert webhook["clientConfig"] == {
        "service": {"name": "promotion-gate", "namespace": NAMESPACE, "path": "/validate", "port": 443}
    }
    assert "objectSelector" not in webhook


def test_rules_cover_every_workload_kind_including_ephemeral_containers(default: Rendered) -> None:
    covered = {
        (group, resource)
        for rule in default.webhook["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert covered == {
        ("", "pods"),
        ("", "pods/ephemeralcontainers"),
        ("", "replicationcontrollers"),
        ("", "podtemplates"),
        ("apps", "deployments"),
        ("apps", "replicasets"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
    }
    for rule in default.webhook["rules"]:
        assert rule["operations"] == ["CREATE", "UPDATE"]
        assert rule["apiVersions"] == ["v1"]
        assert rule["scope"] == "Namespaced"


def test_rules_follow_the_policys_workload_kinds(tmp_path: Path) -> None:
    kinds = [{"apiGroup": "argoproj.io", "kind": "Rollout", "resource": "rollouts", "podSpecPath": "spec.template.spec"}]
    rendered = render({"policy.workloadKinds": kinds})
    assert rendered.webhook["rules"][-1] == {"apiGroups": ["argoproj.io"], "apiVersions": ["*"],
                                              "operations": ["CREATE", "UPDATE"], "resources": ["rollouts"],
                                              "scope": "Namespaced"}
    # and the server reads the same list from the policy it is given
    assert _policy(rendered, tmp_path).workload_kind("argoproj.io", "Rollout") is not None


def _excluded(rendered: Rendered) -> list[str]:
    expressions = rendered.webhook["namespaceSelector"]["matchExpressions"]
    assert expressions[0]["key"] == "kubernetes.io/metadata.name"
    assert expressions[0]["operator"] == "NotIn"
    return list(expressions[0]["values"])


@pytest.mark.parametrize("namespace", ["promotion-gate", "security-tools"])
def test_system_namespaces_and_the_release_namespace_are_never_sent(namespace: str) -> None:
    rendered = render(namespace=namespace)
    assert _excluded(rendered) == ["kube-system", "kube-public", "kube-node-lease", namespace]
    assert "matchLabels" not in rendered.webhook["namespaceSelector"]
    extra = render({"webhook.namespaceSelector.excludeNamespaces": ["istio-system", "kube-system"]})
    assert _excluded(extra) == [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "promotion-gate",
        "istio-system",
    ]


def test_opt_in_mode_requires_the_enforce_label_and_still_excludes_system_namespaces() -> None:
    rendered = render({"webhook.namespaceSelector.mode": "optIn"})
    assert rendered.webhook["namespaceSelector"]["matchLabels"] == {"promotion-gate.io/enforce": "true"}
    assert _excluded(rendered) == ["kube-system", "kube-public", "kube-node-lease", "promotion-gate"]


@pytest.mark.parametrize(
    ("values", "policy", "timeout"),
    [
        ({"webhook.failurePolicy": "Ignore"}, "Ignore", 10),
        ({"webhook.timeoutSeconds": 30}, "Fail", 30),
        ({"webhook.timeoutSeconds": 1, "webhook.failurePolicy": "Ignore"}, "Ignore", 1),
    ],
)
def test_failure_policy_and_timeout_are_configurable(values: dict[str, Any], policy: str, timeout: int) -> None:
    webhook = render(values).webhook
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == (policy, timeout)


def test_url_mode_renders_a_standalone_configuration() -> None:
    # The exact command the end-to-end tests use against a local API server.
    result = run_helm(
        [
            "template",
            str(CHART),
            "--namespace",
            "promotion-gate",
            "--show-only",
            "templates/validatingwebhookconfiguration.yaml",
            "--set",
            "webhook.url=https://127.0.0.1:18443/validate",
            "--set",
            f"webhook.caBundle={CA_BUNDLE}",
        ]
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(documents) == 1
    config = documents[0]
    assert structural_errors(config) == []
    webhook = config["webhooks"][0]
    assert webhook["clientConfig"] == {"url": "https://127.0.0.1:18443/validate", "caBundle": CA_BUNDLE}
    assert "annotations" not in config["metadata"]
    # cert-manager must not overwrite an explicit CA
    assert "annotations" not in render({**URL, **CERT_MANAGER}).webhook_config["metadata"]


# --- certificates ---------------------------------------------------------------------------------


def _operator_rules(rendered: Rendered) -> set[tuple[str, str, str, str, str]]:
    """(kind, group, resource, verb, resourceName) granted to the operator's ServiceAccount."""
    granted: set[tuple[str, str, str, str, str]] = set()
    for binding in rendered.of_kind("ClusterRoleBinding") + rendered.of_kind("RoleBinding"):
        if binding["subjects"][0]["name"] != "promotion-gate-operator":
            continue
        role = rendered.one(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames", ["*"]):
                            granted.add((role["kind"], group, resource, verb, name))
    return granted


OPERATOR_BASE = {
    ("ClusterRole", "promotion-gate.io", "promotions", verb, "*") for verb in ("get", "list", "watch", "patch")
} | {
    ("ClusterRole", "promotion-gate.io", "promotions/status", "patch", "*"),
    ("ClusterRole", "", "events", "create", "*"),
    ("ClusterRole", "apiextensions.k8s.io", "customresourcedefinitions", "list", "*"),
    ("ClusterRole", "apiextensions.k8s.io", "customresourcedefinitions", "watch", "*"),
    ("ClusterRole", "", "namespaces", "list", "*"),
    ("ClusterRole", "", "namespaces", "watch", "*"),
}
OPERATOR_SCAN = {
    ("ClusterRole", group, resource, verb, "*")
    for group, resources in (("", ("pods", "replicationcontrollers")),
                             ("apps", ("deployments", "replicasets", "statefulsets", "daemonsets")),
                             ("batch", ("jobs", "cronjobs")))
    for resource in resources for verb in ("list", "watch")
} | {("ClusterRole", "wgpolicyk8s.io", "policyreports", verb, "*") for verb in ("list", "create", "patch")}
OPERATOR_CERTIFICATES = {
    ("ClusterRole", "admissionregistration.k8s.io", "validatingwebhookconfigurations", verb, "promotion-gate")
    for verb in ("get", "update", "patch")
} | {("Role", "", "secrets", verb, "*") for verb in ("get", "create", "update")}


def test_operator_mode_manages_certificates_with_least_privilege(default: Rendered) -> None:
    assert _operator_rules(default) == OPERATOR_BASE | OPERATOR_SCAN | OPERATOR_CERTIFICATES
    role = default.one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    args = default.container("operator")["args"]
    assert args == [
        "operator",
        "--namespace-scope",
        "all",
        "--key",
        "/etc/promotion-gate/operator-key/key.pem",
        "--manage-certificates",
        "--webhook-config",
        "promotion-gate",
        "--tls-secret",
        "promotion-gate-tls",
        "--service",
        "promotion-gate",
        "--scan",
        "--scan-interval",
        "300",
        "--metrics-address",
        "0.0.0.0:9102",
    ]
    tls = next(v for v in default.deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "promotion-gate-tls"
    assert "caBundle" not in default.webhook["clientConfig"]  # written by the operator
    assert not [o for o in default.objects if o["apiVersion"].startswith("cert-manager.io")]


NAMESPACES_ONLY = [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}]
RUNNING_LOOKUP = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
                  {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
                  {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list"]}]


@pytest.mark.parametrize(("lookup", "rules", "flag"), [(True, NAMESPACES_ONLY + RUNNING_LOOKUP, False),
                                                       (False, NAMESPACES_ONLY, True)])
def test_webhook_service_account_reads_namespaces_and_lists_pods_only_for_trace(
        lookup: bool, rules: list[dict[str, Any]], flag: bool) -> None:
    rendered = render({"server.runningLookup": lookup})
    binding = next(b for b in rendered.of_kind("ClusterRoleBinding") if b["subjects"][0]["name"] == "promotion-gate")
    assert rendered.one("ClusterRole", binding["roleRef"]["name"])["rules"] == rules
    assert [b for b in rendered.of_kind("RoleBinding") if b["subjects"][0]["name"] == "promotion-gate"] == []
    assert ("--no-running-lookup" in rendered.container()["args"]) is flag


def test_cert_manager_mode_issues_the_serving_certificate_and_injects_the_ca() -> None:
    rendered = render(CERT_MANAGER)
    assert rendered.names("Issuer") == ["promotion-gate-selfsigned", "promotion-gate-ca"]
    assert rendered.one("Issuer", "promotion-gate-selfsigned")["spec"] == {"selfSigned": {}}
    assert rendered.one("Issuer", "promotion-gate-ca")["spec"] == {"ca": {"secretName": "promotion-gate-ca"}}
    ca = rendered.one("Certificate", "promotion-gate-ca")["spec"]
    assert ca["isCA"] is True and ca["secretName"] == "promotion-gate-ca"
    serving = rendered.one("Certificate", "promotion-gate-serving")["spec"]
    assert serving["secretName"] == "promotion-gate-tls"
    assert "promotion-gate.promotion-gate.svc" in serving["dnsNames"]
    assert serving["issuerRef"]["name"] == "promotion-gate-ca"
    annotations = rendered.webhook_config["metadata"]["annotations"]
    assert annotations["cert-manager.io/inject-ca-from"] == "promotion-gate/promotion-gate-serving"
    assert _operator_rules(rendered) == OPERATOR_BASE | OPERATOR_SCAN  # no certificate rights without operator mode
    assert not [a for a in rendered.container("operator")["args"] if a.startswith("--manage")]
    custom = render(
        {**CERT_MANAGER, "certificates.certManager.issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
    )
    assert custom.of_kind("Issuer") == []
    assert custom.one("Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_provided_mode_uses_the_given_secret_and_ca_bundle() -> None:
    rendered = render(PROVIDED)
    assert rendered.webhook["clientConfig"]["caBundle"] == CA_BUNDLE
    assert "annotations" not in rendered.webhook_config["metadata"]
    tls = next(v for v in rendered.deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "my-tls"
    assert _operator_rules(rendered) == OPERATOR_BASE | OPERATOR_SCAN
    assert not [o for o in rendered.objects if o["apiVersion"].startswith("cert-manager.io")]


# --- the operator Deployment ----------------------------------------------------------------------


def test_operator_is_a_single_separate_instance(default: Rendered) -> None:
    operator = default.deployment("operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}  # never two instances at once
    pod = operator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "promotion-gate-operator"
    assert default.deployment()["spec"]["template"]["spec"]["serviceAccountName"] == "promotion-gate"
    assert pod["containers"][0]["image"] == default.container()["image"]
    # The operator checks promotions against the same policy file as the webhook, and rolls with it.
    assert _env(pod["containers"][0])["PROMOTION_GATE_POLICY"] == "/etc/promotion-gate/policy/policy.yaml"
    policy = next(v for v in pod["volumes"] if v["name"] == "policy")
    assert policy == {"name": "policy", "configMap": {"name": "promotion-gate-policy"}}
    checksums = [
        d["spec"]["template"]["metadata"]["annotations"]["checksum/policy"] for d in default.of_kind("Deployment")
    ]
    assert len(set(checksums)) == 1
    key = next(v for v in pod["volumes"] if v["name"] == "signing-key")
    assert key["secret"]["secretName"] == "promotion-gate-operator-key"
    assert key["secret"]["items"] == [{"key": "key.pem", "path": "key.pem"}]


OPERATOR_ANCHOR = {
    ("Role", "", "configmaps", "get", "promotion-gate-audit-anchor"),
    ("Role", "", "configmaps", "update", "promotion-gate-audit-anchor"),
    ("Role", "", "configmaps", "create", "*"),
}


def test_the_operator_keeps_the_audit_anchor_with_the_server_key(tmp_path: Path) -> None:
    rendered = render(SERVER_KEY)
    args = rendered.container("operator")["args"]
    at = args.index("--audit-anchor")
    assert args[at:at + 4] == ["--audit-anchor", "promotion-gate-audit-anchor", "--audit-anchor-interval", "30"]
    assert _operator_rules(rendered) == OPERATOR_BASE | OPERATOR_SCAN | OPERATOR_CERTIFICATES | OPERATOR_ANCHOR
    role = rendered.one("Role", "promotion-gate-operator-audit-anchor")
    assert role["metadata"]["namespace"] == NAMESPACE
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(rendered.one("ConfigMap", "promotion-gate-policy")["data"]["policy.yaml"])
    loaded = policy_mod.load(policy_path)
    assert [k.public_pem().decode() for k in loaded.audit_checkpoint_keys] == [SERVER_PUBLIC_KEY]
    switched_off = render({**SERVER_KEY, "auditAnchor.enabled": False})
    assert _operator_rules(switched_off) == OPERATOR_BASE | OPERATOR_SCAN | OPERATOR_CERTIFICATES
    assert "--audit-anchor" not in switched_off.container("operator")["args"]
    assert _operator_rules(render({**SERVER_KEY, "operator.enabled": False, **CERT_MANAGER})) == set()


def test_operator_can_be_disabled() -> None:
    rendered = render({"operator.enabled": False, **CERT_MANAGER})
    assert [d["metadata"]["name"] for d in rendered.of_kind("Deployment")] == ["promotion-gate"]
    assert _operator_rules(rendered) == set()
    assert rendered.names("ServiceAccount") == ["promotion-gate"]


# --- helm test ------------------------------------------------------------------------------------


def test_helm_test_pod_posts_to_the_service_with_the_right_ca(default: Rendered) -> None:
    pod = default.one("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    env = _env(container)
    assert env["WEBHOOK_URL"] == "https://promotion-gate.promotion-gate.svc:443/validate"
    ca = next(v for v in pod["spec"]["volumes"] if v["name"] == "ca")
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the private key
    provided = _env(render(PROVIDED).one("Pod")["spec"]["containers"][0])
    assert provided["CA_BUNDLE"] == CA_BUNDLE
    url = _env(render(URL).one("Pod")["spec"]["containers"][0])
    assert url["WEBHOOK_URL"] == "https://127.0.0.1:9443/validate"
    pinned = render({"tests.image.repository": "r.example/python", "tests.image.digest": DIGEST}).one("Pod")
    assert pinned["spec"]["containers"][0]["image"] == f"r.example/python@{DIGEST}"
    assert render({"tests.enabled": False}).of_kind("Pod") == []


# --- who may reach /validate ------------------------------------------------------------------------


def test_the_client_ca_comes_from_a_configmap_and_names_the_allowed_certificates() -> None:
    rendered = render(CLIENT_CA)
    args = rendered.container()["args"]
    assert args[args.index("--validate-client-ca") + 1] == "/etc/promotion-gate/validate-client-ca/ca.crt"
    assert args[args.index("--validate-client-name") + 1] == "kube-apiserver"
    volumes = rendered.deployment()["spec"]["template"]["spec"]["volumes"]
    assert {"name": "validate-client-ca", "configMap": {"name": "apiserver-client-ca",
                                                          "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in volumes


def test_no_network_policy_and_no_client_ca_by_default(default: Rendered) -> None:
    assert default.of_kind("NetworkPolicy") == []
    assert "--validate-client-ca" not in default.container()["args"]


PEERS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "self-managed: the API servers' addresses": (
        {"networkPolicy.apiServer.cidrs": ["10.0.0.10/32", "10.0.0.11/32"]},
        [{"ipBlock": {"cidr": "10.0.0.10/32"}}, {"ipBlock": {"cidr": "10.0.0.11/32"}}]),
    "managed: the konnectivity agents": (
        {"networkPolicy.apiServer.namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
         "networkPolicy.apiServer.podSelector": {"matchLabels": {"k8s-app": "konnectivity-agent"}}},
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
          "podSelector": {"matchLabels": {"k8s-app": "konnectivity-agent"}}}]),
}


@pytest.mark.parametrize(("values", "peers"), PEERS.values(), ids=PEERS.keys())
def test_network_policy_admits_only_the_api_server_to_the_webhook_port(values: dict[str, Any],
                                                                       peers: list[dict[str, Any]]) -> None:
    rendered = render({"networkPolicy.enabled": True, "tests.enabled": False, **values})
    policy = rendered.one("NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": rendered.deployment()["spec"]["selector"]["matchLabels"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "https", "protocol": "TCP"}], "from": peers}]


def test_network_policy_lets_the_helm_test_pod_and_extra_rules_in() -> None:
    monitoring = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                  "ports": [{"port": 8443, "protocol": "TCP"}]}
    rendered = render({**NETWORK_POLICY, "networkPolicy.extraIngress": [monitoring]})
    ingress = rendered.one("NetworkPolicy")["spec"]["ingress"]
    test_pod = rendered.one("Pod")["metadata"]["labels"]
    (helm_test,) = [rule for rule in ingress if "podSelector" in rule["from"][0]]
    assert helm_test["from"][0]["podSelector"]["matchLabels"].items() <= test_pod.items()
    assert ingress[-1] == monitoring


# --- scanning what runs ---------------------------------------------------------------------------


def test_scan_metrics_are_served_and_scraped_next_to_the_webhooks() -> None:
    rendered = render({"metrics.serviceMonitor.enabled": True})
    container = rendered.container("operator")
    assert container["ports"] == [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
    service = rendered.one("Service", "promotion-gate-operator-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == rendered.deployment("operator")["spec"]["selector"]["matchLabels"]
    monitor = rendered.one("ServiceMonitor", "promotion-gate-operator")
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http",
                                             "interval": "30s"}]


METRICS = ["--metrics-address", "0.0.0.0:9102"]


@pytest.mark.parametrize(("values", "absent_rules", "flags"), [
    ({}, set(), ["--scan", "--scan-interval", "300", *METRICS]),
    ({"operator.scan.enabled": False}, OPERATOR_SCAN, []),
    ({"operator.scan.policyReports": False}, {r for r in OPERATOR_SCAN if r[1] == "wgpolicyk8s.io"},
     ["--scan", "--scan-interval", "300", "--no-policy-reports", *METRICS]),
    ({"operator.scan.revocationEvents": False, "operator.scan.metricsPort": 0, "operator.scan.interval": 60},
     set(), ["--scan", "--scan-interval", "60", "--no-revocation-events"]),
])
def test_scan_settings_become_flags_and_rights(values: dict[str, Any], absent_rules: set[Any],
                                               flags: list[str]) -> None:
    rendered = render(values)
    assert _operator_rules(rendered) == OPERATOR_BASE | OPERATOR_CERTIFICATES | (OPERATOR_SCAN - absent_rules)
    args = rendered.container("operator")["args"]
    assert args[args.index("--service") + 2:] == flags
    served = "--metrics-address" in flags
    assert ("ports" in rendered.container("operator")) is served
    assert ("promotion-gate-operator-metrics" in rendered.names("Service")) is served


def test_scan_interval_below_ten_seconds_is_refused() -> None:
    assert "- at '/operator/scan/interval': minimum: got 1, want 10" in render_error({"operator.scan.interval": 1})
