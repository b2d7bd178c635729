"""What the cluster scenarios share: kubectl and helm against the node, the CLI, keys, the chart's values.

Plain Python (no pytest): ``conftest.py`` decides the lifetimes. The scenarios drive everything the
way an operator, a developer and a CI pipeline would: ``helm``, ``kubectl`` (the toolchain's, the
pinned version) and the ``promotion-gate`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tools.cluster import config

REPO = config.REPO
CHART = REPO / "charts" / "promotion-gate"
APP_CHART = Path(__file__).resolve().parent / "charts" / "app"
RELEASE = "promotion-gate"
RELEASE_NAMESPACE = "promotion-gate"
WEBHOOK = "validate.promotion-gate.io"
ENV_LABEL = "promotion-gate.io/environment"
BREAK_GLASS = "promotion-gate.io/break-glass"
KEY_NAMES = ("ci", "release", "approver-a", "approver-b", "operator")
ONCALL = "oncall@example.com"

T = TypeVar("T")


class ScenarioError(AssertionError):
    """A command failed or a condition never came true; the message says which and shows the output."""


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float = 120, interval: float = 1.0,
             describe: Callable[[], str] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (and the state) on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (ScenarioError, subprocess.SubprocessError, ValueError, KeyError, OSError) as exc:
            value, last = None, exc
        if value:
            return value
        time.sleep(interval)
    detail = describe() if describe else ""
    raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})\n{detail}")


@dataclass
class Kube:
    """kubectl and helm (the toolchain's pinned versions) with the node's admin kubeconfig."""

    kubeconfig: Path
    work_dir: Path
    kubectl_path: Path = field(default_factory=lambda: config.bin_dir() / "kubectl")
    helm_path: Path = field(default_factory=lambda: config.bin_dir() / "helm")

    def _env(self) -> dict[str, str]:
        helm_home = self.work_dir / "helm"
        return {**os.environ, "HELM_CACHE_HOME": str(helm_home / "cache"),
                "HELM_CONFIG_HOME": str(helm_home / "config"), "HELM_DATA_HOME": str(helm_home / "data"),
                "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120,
                user: str | None = None, groups: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        identity = ([f"--as={user}"] if user else []) + [f"--as-group={g}" for g in groups]
        command = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}",
                   f"--cache-dir={self.work_dir / 'kubectl-cache'}", *identity, *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, env=self._env())
        if check and result.returncode != 0:
            raise ScenarioError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        command = [str(self.helm_path), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self._env())
        if check and result.returncode != 0:
            raise ScenarioError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, documents: Sequence[Mapping[str, Any]], *, check: bool = False, user: str | None = None,
              groups: Sequence[str] = (), name: str | None = None) -> Applied:
        """``kubectl apply -f <file>``: kubectl names the file in its errors, so tests can assert the whole text."""
        path = self.work_dir / f"{name or 'manifest'}-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump_all(list(documents), sort_keys=False))
        result = self.kubectl("apply", "-f", str(path), check=check, user=user, groups=groups)
        return Applied(path, result.returncode, result.stdout, result.stderr)

    def namespace(self, prefix: str, environment: str | None = None) -> str:
        """A fresh namespace (the namespace controller runs, but a fresh name keeps tests independent)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        if environment:
            self.kubectl("label", "namespace", name, f"{ENV_LABEL}={environment}")
        return name

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
        return list(self.json(*args)["items"])

    def describe_namespace(self, namespace: str) -> str:
        pods = self.kubectl("get", "all", "-n", namespace, "-o", "wide", check=False).stdout
        events = self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
        return f"--- objects in {namespace}:\n{pods}\n--- events:\n{events[-6000:]}"

    def wait_running(self, namespace: str, selector: str, count: int, *, timeout: float = 180) -> list[dict[str, Any]]:
        def running() -> list[dict[str, Any]] | None:
            pods = [p for p in self.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if p["status"].get("phase") == "Running" and all(
                c.get("ready") for c in p["status"].get("containerStatuses", []))]
            return ready if len(ready) == count and len(pods) == count else None

        return wait_for(f"{count} Running Pod(s) {selector} in {namespace}", running, timeout=timeout,
                        describe=lambda: self.describe_namespace(namespace))

    def events(self, namespace: str, reason: str | None = None) -> list[dict[str, Any]]:
        items = self.json("get", "events", "-n", namespace)["items"]
        return [e for e in items if reason is None or e.get("reason") == reason]


@dataclass(frozen=True)
class Applied:
    path: Path
    returncode: int
    stdout: str
    stderr: str


def denial(path: Path, *lines: str) -> str:
    """kubectl's whole stderr for a denied ``kubectl apply -f path``."""
    return (f'Error from server (Forbidden): error when creating "{path}": '
            f'admission webhook "{WEBHOOK}" denied the request: ' + "\n".join(lines) + "\n")


# --- the promotion-gate command -------------------------------------------------------------------


def cli_command() -> list[str]:
    """``promotion-gate`` from this interpreter's environment (``PROMOTION_GATE_CLI`` overrides it)."""
    override = os.environ.get("PROMOTION_GATE_CLI")
    if override:
        return override.split()
    beside = Path(sys.executable).parent / "promotion-gate"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("promotion-gate")
    if found is None:
        raise ScenarioError("the promotion-gate command is not installed (make venv)")
    return [found]


@dataclass
class Keys:
    """Signing keys made with ``promotion-gate keys generate``, and the policy that trusts them."""

    directory: Path

    def private(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def public(self, name: str) -> str:
        return (self.directory / f"{name}.pem.pub").read_text()

    @classmethod
    def generate(cls, directory: Path) -> Keys:
        directory.mkdir(parents=True, exist_ok=True)
        for name in KEY_NAMES:
            algorithm = "ecdsa-p256" if name == "approver-b" else "ed25519"
            run_cli("keys", "generate", "--out", str(directory / f"{name}.pem"), "--algorithm", algorithm)
        return cls(directory)


def run_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*cli_command(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise ScenarioError(f"promotion-gate {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def policy(keys: Keys, *, cache_seconds: int = 5) -> dict[str, Any]:
    """The policy the release serves: the seed's promotion path, two signatures for production."""
    return {
        "apiVersion": "promotion-gate.io/v1",
        "kind": "Policy",
        "defaultMode": "enforce",
        "keys": {name: {"publicKey": keys.public(name)} for name in KEY_NAMES},
        "environments": [
            {"name": "ci", "trustedKeys": ["ci"], "evidence": {
                "maxTestsFailed": 0, "minTestsPassed": 1, "maxScanFindings": {"critical": 0, "high": 0},
                "requireSource": True}},
            {"name": "staging", "trustedKeys": ["ci", "release", "operator"]},
            {"name": "production", "trustedKeys": ["release", "approver-a", "approver-b"],
             "requiredSignatures": 2},
        ],
        "namespaces": {"unmapped": "deny"},
        "breakGlass": {"users": [ONCALL], "groups": ["platform-oncall"]},
        "store": {"timeoutSeconds": 2, "cacheSeconds": cache_seconds},
        "audit": {"onWriteFailure": "deny"},
    }


@dataclass
class Store:
    """The release's PostgreSQL store, as CI and the security team reach it (``--store``)."""

    dsn: str  # from the host
    policy_file: Path
    keys: Keys

    def record(self, image: str, *, git_commit: str, ci_run: str) -> str:
        # --no-registry: the image's labels are not what this scenario is about (tests/test_registry_*.py).
        return run_cli("record", image, "--no-registry", "--env", "ci", "--git-commit", git_commit, "--ci-run", ci_run,
                       "--git-repository", "github.com/acme/app", "--tests-passed", "42", "--tests-failed", "0",
                       "--scan-critical", "0", "--scan-high", "0", "--key", str(self.keys.private("ci")),
                       "--store", self.dsn, "--policy", str(self.policy_file)).stdout

    def promote(self, image: str, environment: str, *signers: str) -> subprocess.CompletedProcess[str]:
        keys = [arg for name in signers for arg in ("--key", str(self.keys.private(name)))]
        return run_cli("promote", image, "--to", environment, *keys, "--store", self.dsn,
                       "--policy", str(self.policy_file), check=False)

    def revoke(self, image: str, environment: str, reason: str) -> str:
        return run_cli("revoke", image, "--env", environment, "--reason", reason,
                       "--key", str(self.keys.private("release")), "--store", self.dsn,
                       "--policy", str(self.policy_file)).stdout

    def audit(self, *args: str) -> list[dict[str, Any]]:
        output = run_cli("audit", *args, "--output", "json", "--store", self.dsn,
                         "--policy", str(self.policy_file)).stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def promoted(self, image: str, git_commit: str, ci_run: str, *, production: bool = False) -> None:
        """CI's path: record in ci, promote to staging (and to production with two keys)."""
        self.record(image, git_commit=git_commit, ci_run=ci_run)
        for environment, signers in (("staging", ("ci",)), ("production", ("release", "approver-a"))):
            if environment == "production" and not production:
                break
            result = self.promote(image, environment, *signers)
            if result.returncode != 0:
                raise ScenarioError(f"promote --to {environment} failed:\n{result.stdout}{result.stderr}")


# --- manifests ------------------------------------------------------------------------------------


def container(image: str, name: str = "app") -> dict[str, Any]:
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 65532,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}


def pod(name: str, namespace: str, image: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [container(image)]}}


def deployment(name: str, namespace: str, image: str, *, replicas: int = 1,
               template_annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": dict(template_annotations or {})},
                                  "spec": {"terminationGracePeriodSeconds": 1, "containers": [container(image)]}}}}


def cronjob(name: str, namespace: str, image: str, schedule: str = "* * * * *") -> dict[str, Any]:
    spec = {"terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
            "containers": [{**container(image), "command": ["/bin/sh", "-c", "echo judged and admitted"]}]}
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name, "namespace": namespace},
            "spec": {"schedule": schedule, "concurrencyPolicy": "Forbid", "successfulJobsHistoryLimit": 3,
                     "failedJobsHistoryLimit": 3, "startingDeadlineSeconds": 120,
                     "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"cron": name}},
                                                                              "spec": spec}}}}}
