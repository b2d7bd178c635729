"""Registering Promotion Gate with a real API server, the way operators will: from the Helm chart.

The ValidatingWebhookConfiguration is always rendered from ``charts/promotion-gate`` (never written
by hand here), so these tests also prove the chart's rules, selectors and ``sideEffects`` work.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes.client.exceptions import ApiException

from tests.e2e import manifests
from tests.e2e.cluster import Cluster
from tools.servers import REPO, RunningServer

CHART = REPO / "charts" / "promotion-gate"
WEBHOOK_TEMPLATE = "templates/validatingwebhookconfiguration.yaml"
WEBHOOK_NAME = "validate.promotion-gate.io"
RELEASE = "promotion-gate"
RELEASE_NAMESPACE = "promotion-gate"
ENFORCE_LABEL = "promotion-gate.io/enforce"  # the chart's opt-in label (webhook.namespaceSelector.mode=optIn)
ACTIVATION_TIMEOUT = 60.0
T = TypeVar("T")

# What the webhook process runs with in these tests: no environments yet, so every namespace that is
# not exempt gets the digest rule only.
DIGEST_ONLY_POLICY = """\
apiVersion: promotion-gate.io/v1
kind: Policy
namespaces:
  unmapped: digest-only
"""


def unique_name(prefix: str, limit: int = 63) -> str:
    """A DNS-label name nobody used before: without controllers, a deleted namespace never goes away."""
    suffix = secrets.token_hex(3)
    stem = "".join(c if c.isalnum() else "-" for c in prefix.lower()).strip("-")
    stem = "-".join(part for part in stem.split("-") if part)[: limit - len(suffix) - 1].rstrip("-")
    return f"{stem}-{suffix}"


def create_namespace(core: Any, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = unique_name(prefix)
    metadata = {"name": name, "labels": labels or {"e2e.promotion-gate.io/test": "true"}}
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    return name


def ca_bundle(server: RunningServer) -> str:
    return base64.b64encode(server.ca.read_bytes()).decode()


def eventually(attempt: Callable[[], T | None], *, timeout: float = ACTIVATION_TIMEOUT, interval: float = 0.5,
               what: str = "condition") -> T:
    """Call ``attempt`` until it returns something other than None (caches catch up asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_ready(server: RunningServer, timeout: float = 60.0) -> None:
    """``/readyz`` turns 200 once the namespace cache has synced from the API server."""
    deadline = time.monotonic() + timeout
    while True:
        reply = server.get("/readyz")
        if reply.status_code == 200:
            return
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"webhook server not ready: {reply.status_code} {reply.text}\n{server.log()}")
        time.sleep(0.2)


def chart_template() -> Path:
    template = CHART / WEBHOOK_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"{template} is missing: the end-to-end tests register the webhook from the chart")
    return template


def render_webhook_configuration(cluster: Cluster, *, url: str, ca_bundle: str, release: str = RELEASE,
                                 failure_policy: str = "Fail", timeout_seconds: int | None = None,
                                 extra_set: Sequence[str] = ()) -> dict[str, Any]:
    """``helm template`` of the chart's ValidatingWebhookConfiguration for an out-of-cluster server."""
    chart_template()
    args = ["template", release, str(CHART), "--namespace", RELEASE_NAMESPACE,
            "--show-only", WEBHOOK_TEMPLATE,
            "--set", f"webhook.url={url}", "--set", f"webhook.caBundle={ca_bundle}",
            "--set", f"webhook.failurePolicy={failure_policy}"]
    if timeout_seconds is not None:
        args += ["--set", f"webhook.timeoutSeconds={timeout_seconds}"]
    for item in extra_set:
        args += ["--set", item]
    if cluster.server_version:
        args += ["--kube-version", cluster.server_version]
    documents = [d for d in yaml.safe_load_all(cluster.helm(*args).stdout) if d]
    assert [d["kind"] for d in documents] == ["ValidatingWebhookConfiguration"], documents
    return documents[0]  # type: ignore[no-any-return]


def apply(cluster: Cluster, document: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=manifests.to_yaml(document))


def wait_until_enforced(cluster: Cluster, core: Any, namespace: str, *, timeout: float = ACTIVATION_TIMEOUT,
                        expect: str = "denied the request") -> str:
    """Create a known-bad Pod until the API server refuses it: the webhook is then really in the path.

    A configuration is picked up by the API server asynchronously; anything asserted before this
    returns could pass only because the webhook was not called yet.
    """
    deadline = time.monotonic() + timeout
    last = ""
    for attempt in itertools.count():
        name = f"probe-{attempt}"
        try:
            core.create_namespaced_pod(namespace,
                                       manifests.pod(name, namespace, {"probe": manifests.PROBE_IMAGE}))
        except ApiException as exc:
            last = str(exc.body)
            if expect in last:
                return last
        else:
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
            last = f"pod {namespace}/{name} was admitted"
        if time.monotonic() > deadline:
            raise AssertionError(f"the webhook did not start refusing {manifests.PROBE_IMAGE} within "
                                 f"{timeout:.0f}s; last answer: {last}")
        time.sleep(0.5)
    raise AssertionError("unreachable")


@dataclass
class Gate:
    """Promotion Gate registered with the cluster: who serves it and under which configuration."""

    cluster: Cluster
    configuration: str
    server: RunningServer | None = None  # None when the webhook runs inside the cluster (kind)
    logs: dict[str, Path] = field(default_factory=dict)

    def unregister(self) -> None:
        self.cluster.kubectl("delete", "validatingwebhookconfiguration", self.configuration,
                             "--ignore-not-found", check=False)


def register_local(cluster: Cluster, server: RunningServer, *, release: str = RELEASE,
                   failure_policy: str = "Fail", extra_set: Sequence[str] = ()) -> Gate:
    document = render_webhook_configuration(cluster, url=f"{server.url}/validate",
                                            ca_bundle=ca_bundle(server), release=release,
                                            failure_policy=failure_policy, extra_set=extra_set)
    apply(cluster, document)
    return Gate(cluster, document["metadata"]["name"], server, {f"webhook {release}": server.log_path})


# --- PROMOTION_GATE_CLUSTER=kind: the webhook runs inside the cluster, installed by the chart. ---------
# Not exercised on machines without Docker; see docs/e2e.md.

IMAGE_ENV = "PROMOTION_GATE_IMAGE"


def _image_values(reference: str) -> dict[str, str]:
    if "@" in reference:
        repository, digest = reference.split("@", 1)
        return {"repository": repository, "digest": digest}
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        return {"repository": reference}
    return {"repository": repository, "tag": tag}


def install_in_cluster(cluster: Cluster, work_dir: Path) -> Gate:
    """``helm upgrade --install`` the chart with a serving certificate the tests generate (mode provided)."""
    from webhook import certs

    reference = os.environ.get(IMAGE_ENV, "")
    if not reference:
        raise RuntimeError(f"{IMAGE_ENV} must name the promotion-gate image loaded into the kind cluster "
                           "(docker build -t promotion-gate:e2e . && "
                           "kind load docker-image promotion-gate:e2e)")
    service = f"{RELEASE}.{RELEASE_NAMESPACE}.svc"
    ca_pem, ca_key = certs.new_ca("promotion-gate e2e webhook CA")
    cert_pem, key_pem = certs.issue(ca_pem, ca_key, (service, f"{service}.cluster.local"))
    secret = f"{RELEASE}-e2e-tls"
    cluster.kubectl("create", "namespace", RELEASE_NAMESPACE, check=False)
    tls_dir = work_dir / "webhook-tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    (tls_dir / "tls.crt").write_bytes(cert_pem)
    (tls_dir / "tls.key").write_bytes(key_pem)
    cluster.kubectl("-n", RELEASE_NAMESPACE, "create", "secret", "tls", secret,
                    f"--cert={tls_dir / 'tls.crt'}", f"--key={tls_dir / 'tls.key'}")
    values = {
        "replicaCount": 1,
        "image": {**_image_values(reference), "pullPolicy": "Never"},
        "store": {"type": "sqlite"},
        "operator": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "tests": {"enabled": False},
        "certificates": {"mode": "provided",
                         "provided": {"secretName": secret, "caBundle": base64.b64encode(ca_pem).decode()}},
        "policy": {**yaml.safe_load(DIGEST_ONLY_POLICY), "environments": []},
    }
    values_file = work_dir / "kind-values.yaml"
    values_file.write_text(yaml.safe_dump(values, sort_keys=False))
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
                 "--values", str(values_file), "--wait", "--timeout", "5m")
    rendered = render_webhook_configuration(cluster, url="https://unused/validate", ca_bundle="")
    return Gate(cluster, rendered["metadata"]["name"])


# --- A second Promotion Gate next to the session's, for tests that need another policy or a store ------
# Such a gate is registered from the same chart under its own release name with
# webhook.namespaceSelector.mode=optIn, so it judges only namespaces labelled promotion-gate.io/enforce=true.
# The session's registration (optOut, digest-only enforce policy) would judge those namespaces too: it
# would refuse what the test wants admitted (a tag in warn or audit mode, or under break-glass), and its
# findings would mix with this gate's. So each of them is added to the session registration's own
# exclusion list (the chart's kubernetes.io/metadata.name NotIn rule) while the test runs, and taken out
# again afterwards. Only one such gate exists at a time:
# every opt-in registration matches every opt-in namespace, so one is unregistered, and proven out of
# the path, before the next starts.

ENVIRONMENT_LABEL = "promotion-gate.io/environment"
NAME_KEY = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Applied:
    """What ``kubectl apply -f <file>`` answered; the file's path appears in kubectl's errors."""

    path: Path
    returncode: int
    stdout: str
    stderr: str


Apply = Callable[..., Applied]  # the kubectl_apply fixture: (*documents, args=(...)) -> Applied


def apply_file(cluster: Cluster, path: Path, *documents: manifests.Manifest, args: Sequence[str] = ()) -> Applied:
    """Write ``documents`` to ``path`` and ``kubectl apply`` it (``args``: --as, --dry-run=server, ...)."""
    path.write_text(manifests.to_yaml(*documents))
    result = cluster.kubectl("apply", *args, "-f", str(path), check=False)
    return Applied(path, result.returncode, result.stdout, result.stderr)


def decisions(server: RunningServer) -> list[dict[str, Any]]:
    """The server's decision log (``"msg":"admission decision"`` JSON lines on its stdout), oldest first."""
    return [json.loads(line) for line in server.log().splitlines()
            if line.startswith("{") and '"msg":"admission decision"' in line]


def decision_for(server: RunningServer, namespace: str, name: str) -> list[dict[str, Any]]:
    return [d for d in decisions(server) if d.get("namespace") == namespace and d.get("name") == name]


def _name_rule(cluster: Cluster, configuration: str) -> tuple[str, list[str]]:
    """JSON-pointer of the NotIn values of the name rule of the configuration's (only) webhook."""
    document = json.loads(cluster.kubectl("get", "validatingwebhookconfiguration", configuration,
                                          "-o", "json").stdout)
    expressions = document["webhooks"][0]["namespaceSelector"]["matchExpressions"]
    for index, expression in enumerate(expressions):
        if expression["key"] == NAME_KEY and expression["operator"] == "NotIn":
            return (f"/webhooks/0/namespaceSelector/matchExpressions/{index}/values",
                    list(expression["values"]))
    raise AssertionError(f"{configuration} has no {NAME_KEY} NotIn rule: {expressions}")


def exclude_namespace(cluster: Cluster, configuration: str, namespace: str) -> None:
    """Add ``namespace`` to the names a registration never sends (the chart's excludeNamespaces rule)."""
    pointer, _ = _name_rule(cluster, configuration)
    patch = [{"op": "add", "path": f"{pointer}/-", "value": namespace}]
    cluster.kubectl("patch", "validatingwebhookconfiguration", configuration, "--type=json",
                    "-p", json.dumps(patch))


def include_namespaces(cluster: Cluster, configuration: str, namespaces: Sequence[str]) -> None:
    """Undo :func:`exclude_namespace` (a ``test`` op makes a concurrent change fail loudly, not vanish)."""
    pointer, values = _name_rule(cluster, configuration)
    kept = [v for v in values if v not in namespaces]
    if kept == values:
        return
    patch = [{"op": "test", "path": pointer, "value": values}, {"op": "replace", "path": pointer, "value": kept}]
    cluster.kubectl("patch", "validatingwebhookconfiguration", configuration, "--type=json",
                    "-p", json.dumps(patch))


def wait_until_unjudged(core: Any, namespace: str, *, timeout: float = ACTIVATION_TIMEOUT) -> None:
    """Create a tag Pod until one is admitted: no webhook judges ``namespace`` any more."""
    names = (f"unjudged-probe-{i}" for i in itertools.count())

    def admitted() -> bool | None:
        name = next(names)
        try:
            core.create_namespaced_pod(namespace, manifests.pod(name, namespace, {"probe": manifests.PROBE_IMAGE}))
        except ApiException:
            return None
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        return True

    eventually(admitted, timeout=timeout, interval=0.2, what=f"no webhook to judge namespace {namespace}")


@dataclass
class SoloGate:
    """A Promotion Gate of a test's own (policy, store) that judges only the namespaces it hands out."""

    cluster: Cluster
    core: Any
    server: RunningServer
    registration: Gate
    session_configuration: str | None  # the session's registration, told to leave our namespaces alone
    namespaces: list[str] = field(default_factory=list)
    _probes: Iterator[int] = field(default_factory=itertools.count)

    def namespace(self, prefix: str, environment: str | None = None) -> str:
        """A fresh namespace judged by this gate alone, once the server sees ``environment`` on it."""
        name = create_namespace(self.core, prefix)
        self.namespaces.append(name)
        if self.session_configuration is not None:
            exclude_namespace(self.cluster, self.session_configuration, name)
            wait_until_unjudged(self.core, name)
        labels = {ENFORCE_LABEL: "true"}
        if environment is not None:
            labels[ENVIRONMENT_LABEL] = environment
        self.core.patch_namespace(name, {"metadata": {"labels": labels}})
        self.wait_until_judged(name, environment)
        return name

    def _probe(self, namespace: str) -> list[dict[str, Any]]:
        """Create (and delete, if admitted) a Pod; the decisions this server logged about it."""
        name = f"probe-{next(self._probes)}"
        try:
            self.core.create_namespaced_pod(namespace,
                                            manifests.pod(name, namespace, {"probe": manifests.PROBE_IMAGE}))
        except ApiException:
            pass
        else:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        return decision_for(self.server, namespace, name)

    def wait_until_judged(self, namespace: str, environment: str | None) -> None:
        """Until the API server calls this gate for ``namespace`` and the server's namespace watch has
        caught up with its environment label (both happen asynchronously)."""
        def judged() -> bool | None:
            seen = self._probe(namespace)
            return True if seen and seen[-1]["environment"] == environment else None

        eventually(judged, interval=0.2, what=f"{self.registration.configuration} to judge {namespace} "
                                              f"as environment {environment!r}")

    def close(self) -> None:
        """Unregister, prove the API server stopped calling the server, give the namespaces back, stop it."""
        try:
            self.registration.unregister()
            if self.namespaces:
                eventually(lambda: True if not self._probe(self.namespaces[-1]) else None, interval=0.2,
                           what=f"the API server to stop calling {self.registration.configuration}")
            if self.session_configuration is not None:
                include_namespaces(self.cluster, self.session_configuration, self.namespaces)
        finally:
            self.server.stop()


def register_solo(cluster: Cluster, core: Any, server: RunningServer, *, release: str,
                  session_gate: Gate | None) -> SoloGate:
    registration = register_local(cluster, server, release=release,
                                  extra_set=["webhook.namespaceSelector.mode=optIn"])
    return SoloGate(cluster, core, server, registration,
                    session_gate.configuration if session_gate is not None else None)
