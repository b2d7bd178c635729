"""Workloads that "run" on a control plane without controllers or kubelet, for the scan tests.

The local control plane stores objects but runs nothing, so these helpers play the controllers'
part with plain API calls: a Deployment gets a ReplicaSet it owns and Pods the ReplicaSet owns,
with a node name and a status that says Running (started when, which digest the runtime pulled).
A rollout is what the Deployment controller would do: a new ReplicaSet and Pods, the old ones gone.

Namespaces made here are kept out of every opt-out Promotion Gate registration of the session
(the webhook would refuse the malformed images these tests need to store), the way
``gate.SoloGate`` does it, and given back afterwards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.e2e import gate as gate_mod
from tests.e2e.cluster import Cluster
from tools.promotion_kit import Kit
from tools.servers import REPO

STARTED = "2026-11-25T10:00:00Z"
_counter = itertools.count()


# --- namespaces no webhook judges -------------------------------------------------------------------


def _opt_out_registrations(cluster: Cluster) -> list[str]:
    """ValidatingWebhookConfigurations of Promotion Gate that judge every namespace not excluded by name."""
    listed = json.loads(cluster.kubectl("get", "validatingwebhookconfigurations", "-o", "json").stdout)
    found = []
    for item in listed["items"]:
        webhooks = item.get("webhooks") or []
        if not webhooks or webhooks[0].get("name") != gate_mod.WEBHOOK_NAME:
            continue
        selector = webhooks[0].get("namespaceSelector") or {}
        if not selector.get("matchLabels"):  # optIn registrations only judge labelled namespaces
            found.append(item["metadata"]["name"])
    return found


@dataclass
class Namespaces:
    """Fresh namespaces that no Promotion Gate webhook judges, given back to the registrations at the end."""

    cluster: Cluster
    core: Any
    made: list[str] = field(default_factory=list)
    excluded_from: list[str] = field(default_factory=list)

    def create(self, prefix: str, environment: str | None = "production") -> str:
        labels = {"e2e.promotion-gate.io/test": "true"}
        if environment:
            labels[gate_mod.ENVIRONMENT_LABEL] = environment
        name = gate_mod.create_namespace(self.core, prefix, labels)
        self.made.append(name)
        registrations = _opt_out_registrations(self.cluster)
        for configuration in registrations:
            gate_mod.exclude_namespace(self.cluster, configuration, name)
            if configuration not in self.excluded_from:
                self.excluded_from.append(configuration)
        if registrations:
            gate_mod.wait_until_unjudged(self.core, name)
        return name

    def release(self) -> None:
        for configuration in self.excluded_from:
            if configuration in _opt_out_registrations(self.cluster):
                gate_mod.include_namespaces(self.cluster, configuration, self.made)


# --- objects, as the controllers would make them ---------------------------------------------------


def pod_spec(containers: dict[str, str]) -> dict[str, Any]:
    return {"containers": [{"name": name, "image": image} for name, image in containers.items()]}


def template(app: str, containers: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": {"app": app}}, "spec": pod_spec(containers)}


def owner(obj: Any, kind: str, api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": obj.metadata.name, "uid": obj.metadata.uid,
            "controller": True}


def resolved(image: str) -> str:
    """The imageID a container runtime reports: the repository digest it pulled."""
    if "@" in image:
        return image
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return f"{repository}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"


def run_pod(core: Any, namespace: str, name: str, containers: dict[str, str],
            owner_ref: dict[str, Any] | None = None, *, started: str = STARTED, labels: dict[str, str] | None = None,
            image_ids: dict[str, str] | None = None) -> Any:
    """A Pod on node-1 whose status says Running since ``started``."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
    if owner_ref is not None:
        metadata["ownerReferences"] = [owner_ref]
    pod = core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                                                 "spec": {"nodeName": "node-1", **pod_spec(containers)}})
    statuses = [{"name": c, "image": image, "imageID": (image_ids or {}).get(c, resolved(image)), "ready": True,
                 "restartCount": 0, "started": True, "state": {"running": {"startedAt": started}}}
                for c, image in containers.items()]
    core.patch_namespaced_pod_status(name, namespace, {"status": {
        "phase": "Running", "startTime": started, "containerStatuses": statuses}})
    return pod


@dataclass
class Deployed:
    name: str
    replica_set: str
    pods: list[str]


def deployment(apps: Any, core: Any, namespace: str, name: str, containers: dict[str, str], replicas: int = 2,
               *, started: str = STARTED) -> Deployed:
    created = apps.create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": template(name, containers)}})
    return _replica_set(apps, core, namespace, created, containers, replicas, started)


def _replica_set(apps: Any, core: Any, namespace: str, deployed: Any, containers: dict[str, str], replicas: int,
                 started: str) -> Deployed:
    name = deployed.metadata.name
    suffix = hashlib.sha256(json.dumps(containers, sort_keys=True).encode()).hexdigest()[:8]
    replica_set = apps.create_namespaced_replica_set(namespace, {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": f"{name}-{suffix}", "ownerReferences": [owner(deployed, "Deployment", "apps/v1")]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name, "rs": suffix}},
                 "template": {"metadata": {"labels": {"app": name, "rs": suffix}}, "spec": pod_spec(containers)}}})
    pods = [f"{replica_set.metadata.name}-{i}" for i in range(replicas)]
    for pod in pods:
        run_pod(core, namespace, pod, containers, owner(replica_set, "ReplicaSet", "apps/v1"), started=started,
                labels={"app": name, "rs": suffix})
    return Deployed(name, replica_set.metadata.name, pods)


def roll(apps: Any, core: Any, namespace: str, before: Deployed, containers: dict[str, str], *,
         started: str = "2026-11-26T09:00:00Z") -> Deployed:
    """What the Deployment controller does for a new template: new ReplicaSet and Pods, the old Pods gone."""
    patched = apps.patch_namespaced_deployment(before.name, namespace, {"spec": {"template": template(
        before.name, containers)}})
    after = _replica_set(apps, core, namespace, patched, containers, len(before.pods), started)
    for pod in before.pods:
        core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
    apps.patch_namespaced_replica_set(before.replica_set, namespace, {"spec": {"replicas": 0}})
    return after


def statefulset(apps: Any, core: Any, namespace: str, name: str, containers: dict[str, str], replicas: int = 1,
                *, started: str = STARTED) -> list[str]:
    created = apps.create_namespaced_stateful_set(namespace, {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
        "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                 "template": template(name, containers)}})
    pods = [f"{name}-{i}" for i in range(replicas)]
    for pod in pods:
        run_pod(core, namespace, pod, containers, owner(created, "StatefulSet", "apps/v1"), started=started,
                labels={"app": name})
    return pods


def cronjob(batch: Any, namespace: str, name: str, containers: dict[str, str]) -> None:
    """A CronJob between runs: only its template names images."""
    spec = {"restartPolicy": "OnFailure", **pod_spec(containers)}
    batch.create_namespaced_cron_job(namespace, {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": spec}}}}})


# --- the operator as a process -----------------------------------------------------------------------

OPERATOR_COMMAND = [sys.executable, "-m", "webhook.cli", "operator"]


@dataclass
class ScanningOperator:
    cluster: Cluster
    args: list[str]
    log_path: Path
    metrics_port: int
    kubeconfig: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig or self.cluster.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*OPERATOR_COMMAND, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=REPO, env=env)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the operator did not stop on SIGTERM:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log()}")

    def metrics(self) -> str:
        self.check_alive()
        response = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        response.raise_for_status()
        return response.text

    def gauge(self, namespaces: set[str]) -> dict[tuple[str, str, str, str], float]:
        """promotion_gate_noncompliant_containers for these namespaces: (namespace, environment, reason, revoked)."""
        from prometheus_client.parser import text_string_to_metric_families

        found: dict[tuple[str, str, str, str], float] = {}
        for family in text_string_to_metric_families(self.metrics()):
            if family.name != "promotion_gate_noncompliant_containers":
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels["namespace"] in namespaces:
                    found[(labels["namespace"], labels["environment"], labels["reason"], labels["revoked"])] = \
                        sample.value
        return found


def cli(cluster: Cluster, *args: str, kubeconfig: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``promotion-gate`` with the cluster's kubeconfig (or another one) in KUBECONFIG."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or cluster.kubeconfig)}
    return subprocess.run([sys.executable, "-m", "webhook.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def promote_to_production(cluster: Cluster, kit: Kit, store: str, image: str) -> None:
    """ci -> staging -> production through the CLI, each step signed as the kit's policy requires."""
    local = ["--store", store, "--policy", str(kit.policy_path)]
    steps = [
        ["record", image, "--no-registry", "--env", "ci", "--git-commit", "4f2c9e1", "--git-repository", "github.com/acme/api",
         "--ci-run", "8812", "--tests-passed", "120", "--tests-failed", "0", "--scan-critical", "0",
         "--scan-high", "0", "--key", str(kit.key("ci"))],
        ["promote", image, "--to", "staging", "--key", str(kit.key("ci"))],
        ["promote", image, "--to", "production", "--key", str(kit.key("release")), "--key", str(kit.key("approver-a"))],
    ]
    for step in steps:
        result = cli(cluster, *step, *local)
        assert result.returncode == 0, result.stderr


def eventually(attempt: Any, *, timeout: float = 60, what: str) -> Any:
    return gate_mod.eventually(attempt, timeout=timeout, interval=0.5, what=what)


def wait_seconds(seconds: float) -> None:
    time.sleep(seconds)


# --- an API server that never answers ------------------------------------------------------------------


@contextmanager
def silent_api_server(cluster: Cluster, directory: Path) -> Iterator[tuple[str, Path]]:
    """A TCP listener that accepts connections and never says a word, and a kubeconfig that points at it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)

    thread = threading.Thread(target=accept, name="silent-api-server", daemon=True)
    thread.start()
    server = f"https://127.0.0.1:{listener.getsockname()[1]}"
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = server
    kubeconfig = directory / "silent.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    try:
        yield server, kubeconfig
    finally:
        listener.close()
        for connection in held:
            connection.close()
