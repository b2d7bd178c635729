"""A real Kubernetes API server for the end-to-end tests and the scan benchmark.

``local`` (the default): etcd and kube-apiserver as local processes on free loopback ports, the way
controller-runtime's envtest does it. No kubelet, scheduler or controllers: Pods are stored but never
run, which is all an admission webhook needs. The binaries come from ``tools/build-toolchain.sh``
(``make toolchain``). ``kind``: an existing cluster named by ``KUBECONFIG``; nothing is started.

Everything here is plain Python (no pytest): the fixtures in ``tests/e2e/conftest.py`` (which import it
through ``tests/e2e/cluster.py``) and ``tools/bench.py`` decide the lifetimes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tools.servers import free_port
from webhook import certs

ClusterKind = Literal["local", "kind"]
CLUSTER_ENV = "PROMOTION_GATE_CLUSTER"
START_TIMEOUT = 180.0
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


class ToolchainMissing(RuntimeError):
    """A binary the end-to-end tests need is not built yet."""


class ControlPlaneError(RuntimeError):
    """etcd or kube-apiserver did not come up; the message carries the tail of its log."""


def cluster_kind(environ: Mapping[str, str] = os.environ) -> ClusterKind:
    value = environ.get(CLUSTER_ENV, "local") or "local"
    if value not in ("local", "kind"):
        raise ValueError(f"{CLUSTER_ENV}={value!r}: expected 'local' (default) or 'kind'")
    return value  # type: ignore[return-value]


def toolchain_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The bin directory of tools/build-toolchain.sh (same precedence as the script and the Makefile)."""
    root = environ.get("PROMOTION_GATE_CACHE") or str(
        Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promotion-gate")
    return Path(root) / "bin"


def find_binaries(names: Sequence[str], environ: Mapping[str, str] = os.environ) -> dict[str, Path]:
    """Each binary from the toolchain cache, else from PATH; one error naming every missing one."""
    bin_dir = toolchain_dir(environ)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        cached = bin_dir / name
        if cached.is_file() and os.access(cached, os.X_OK):
            found[name] = cached
            continue
        on_path = shutil.which(name, path=environ.get("PATH"))
        if on_path:
            found[name] = Path(on_path)
        else:
            missing.append(name)
    if missing:
        raise ToolchainMissing(
            f"end-to-end tests need {', '.join(missing)}, not found in {bin_dir} nor on PATH. "
            "Build them with `make toolchain` (tools/build-toolchain.sh: etcd, kube-apiserver, kubectl "
            "and helm from pinned Go modules, cached outside the repository), or deselect these tests "
            "with -m 'not e2e'."
        )
    return found


def tail(path: Path, *, start: int = 0, max_lines: int = 150) -> str:
    """The last lines of a log from byte offset ``start`` (what a failing test wants to see)."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    lines = data.decode(errors="replace").splitlines()
    skipped = len(lines) - max_lines
    text = "\n".join(lines[-max_lines:])
    return f"... ({skipped} earlier lines in {path})\n{text}" if skipped > 0 else text


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, args: Sequence[str | Path], log_path: Path) -> ManagedProcess:
        with log_path.open("ab") as log:
            process = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        return cls(name, process, log_path)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            log = tail(self.log_path, max_lines=60)
            raise ControlPlaneError(f"{self.name} exited with status {self.process.returncode}:\n{log}")

    def stop(self, grace: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    """What a test needs to talk to the API server: a kubeconfig, real clients, and the logs."""

    kind: ClusterKind
    kubeconfig: Path
    server: str
    work_dir: Path
    kubectl_path: Path
    helm_path: Path
    server_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    startup_seconds: float | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    # The CA of the client certificate kube-apiserver presents to every webhook (its AdmissionConfiguration);
    # None on a cluster the tests did not start.
    webhook_client_ca: Path | None = None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; ``check`` raises with kubectl's stderr."""
        cache = self.work_dir / "kubectl-cache"
        command = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache}", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout,
                                env=self._tool_env())
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [str(self.helm_path), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=self._tool_env())
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def _tool_env(self) -> dict[str, str]:
        # Keep helm's and kubectl's caches and config in the test's own directory, not in $HOME.
        helm_home = self.work_dir / "helm"
        return {**os.environ, "HELM_CACHE_HOME": str(helm_home / "cache"),
                "HELM_CONFIG_HOME": str(helm_home / "config"), "HELM_DATA_HOME": str(helm_home / "data")}

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (the official Python client)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]

    def describe(self) -> list[str]:
        lines = [f"cluster: {self.kind} at {self.server} (server {self.server_version or 'unknown'})"]
        if self.startup_seconds is not None:
            lines.append(f"control plane ready in {self.startup_seconds:.1f}s "
                         "(etcd + kube-apiserver, /readyz and namespace 'default')")
        lines += [f"{name}: {version}" for name, version in self.versions.items()]
        build_log = toolchain_dir() / "build-times.log"
        if build_log.is_file():  # written by tools/build-toolchain.sh when it builds (cold) a binary
            lines += [f"cold build: {line}" for line in build_log.read_text().splitlines()[-3:]]
        lines.append(f"kubeconfig: {self.kubeconfig}")
        return lines


def _first_line(output: str) -> str:
    return next((line.strip() for line in output.splitlines() if line.strip()), "")


def tool_versions(binaries: Mapping[str, Path]) -> dict[str, str]:
    commands = {
        "etcd": ["--version"],
        "kube-apiserver": ["--version"],
        "kubectl": ["version", "--client", "-o", "json"],
        "helm": ["version", "--short"],
    }
    versions: dict[str, str] = {}
    for name, path in binaries.items():
        result = subprocess.run([str(path), *commands[name]], capture_output=True, text=True, timeout=30)
        text = result.stdout or result.stderr
        if name == "kubectl":
            with contextlib.suppress(ValueError, KeyError):
                text = json.loads(text)["clientVersion"]["gitVersion"]
        versions[name] = f"{_first_line(text)} ({path})"
    return versions


def write_kubeconfig(path: Path, *, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes,
                     name: str = "e2e") -> None:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name,
                      "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": b64(cert_pem),
                                             "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "admin"}}],
        "current-context": name,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)


@dataclass(frozen=True)
class Pki:
    """Everything kube-apiserver and its admin need, as files."""

    serving_ca: Path
    serving_cert: Path
    serving_key: Path
    client_ca: Path
    admin_cert: Path
    admin_key: Path
    sa_private: Path
    sa_public: Path
    webhook_client_ca: Path
    webhook_client_cert: Path
    webhook_client_key: Path

    @classmethod
    def generate(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        serving_ca, serving_ca_key = certs.new_ca("promotion-gate e2e apiserver CA")
        serving_cert, serving_key = certs.issue(serving_ca, serving_ca_key, ("127.0.0.1", "localhost"),
                                                common_name="kube-apiserver")
        client_ca, client_ca_key = certs.new_ca("promotion-gate e2e client CA")
        admin_cert, admin_key = certs.issue(client_ca, client_ca_key, (), client=True, common_name="admin",
                                            organization="system:masters")
        sa_key = ec.generate_private_key(ec.SECP256R1())
        sa_private = sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        sa_public = sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        # What kube-apiserver presents to webhooks (throw-away test credentials, generated per run).
        webhook_client_ca, webhook_client_ca_key = certs.new_ca("promotion-gate e2e webhook-client CA")
        webhook_client_cert, webhook_client_key = certs.issue(webhook_client_ca, webhook_client_ca_key, (),
                                                              client=True, common_name="kube-apiserver")
        contents = {
            "serving-ca.crt": serving_ca, "apiserver.crt": serving_cert, "apiserver.key": serving_key,
            "client-ca.crt": client_ca, "admin.crt": admin_cert, "admin.key": admin_key,
            "sa.key": sa_private, "sa.pub": sa_public, "webhook-client-ca.crt": webhook_client_ca,
            "webhook-client.crt": webhook_client_cert, "webhook-client.key": webhook_client_key,
        }
        for name, data in contents.items():
            path = directory / name
            path.write_bytes(data)
            if name.endswith(".key"):
                path.chmod(0o600)
        return cls(*(directory / name for name in contents))


def write_admission_configuration(directory: Path, pki: Pki) -> Path:
    """kube-apiserver's AdmissionConfiguration: present the webhook client certificate to every webhook.

    The kubeconfig's user name is the webhook's host; ``*`` matches all of them. A webhook that asks for
    no client certificate never sees it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    kubeconfig = directory / "webhook-kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "users": [{"name": "*", "user": {
            "client-certificate-data": base64.b64encode(pki.webhook_client_cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(pki.webhook_client_key.read_bytes()).decode()}}],
    }, sort_keys=False))
    kubeconfig.chmod(0o600)
    configuration = directory / "admission-configuration.yaml"
    configuration.write_text(yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
        "plugins": [{"name": "ValidatingAdmissionWebhook", "configuration": {
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": str(kubeconfig)}}],
    }, sort_keys=False))
    return configuration


class LocalControlPlane:
    """etcd + kube-apiserver on loopback, data and certificates under ``work_dir``."""

    def __init__(self, work_dir: Path, *, timeout: float = START_TIMEOUT) -> None:
        self.work_dir = work_dir
        self.timeout = timeout
        self.processes: list[ManagedProcess] = []
        self.binaries = find_binaries(["etcd", "kube-apiserver", "kubectl", "helm"])
        self.logs = {"etcd": work_dir / "logs" / "etcd.log",
                     "kube-apiserver": work_dir / "logs" / "kube-apiserver.log"}

    def start(self) -> Cluster:
        started = time.monotonic()
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        pki = Pki.generate(self.work_dir / "pki")
        etcd_url = self._start_etcd()
        port = free_port()
        server = f"https://127.0.0.1:{port}"
        admission = write_admission_configuration(self.work_dir / "admission", pki)
        self._start_apiserver(pki, etcd_url, port, admission)
        kubeconfig = self.work_dir / "kubeconfig"
        write_kubeconfig(kubeconfig, server=server, ca_pem=pki.serving_ca.read_bytes(),
                         cert_pem=pki.admin_cert.read_bytes(), key_pem=pki.admin_key.read_bytes())
        deadline = started + self.timeout
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override session.verify; no proxies on loopback
        session.verify = str(pki.serving_ca)
        session.cert = (str(pki.admin_cert), str(pki.admin_key))
        # /readyz with the admin certificate: anonymous requests get 403 until RBAC is bootstrapped.
        self._wait(deadline, "kube-apiserver /readyz", lambda: session.get(f"{server}/readyz", timeout=5).ok)
        self._wait(deadline, "namespace 'default'",
                   lambda: session.get(f"{server}/api/v1/namespaces/default", timeout=5).ok)
        elapsed = time.monotonic() - started
        server_version = session.get(f"{server}/version", timeout=5).json().get("gitVersion", "")
        cluster = Cluster(
            kind="local", kubeconfig=kubeconfig, server=server, work_dir=self.work_dir,
            kubectl_path=self.binaries["kubectl"], helm_path=self.binaries["helm"],
            server_version=server_version, versions=tool_versions(self.binaries), startup_seconds=elapsed,
            logs=dict(self.logs), webhook_client_ca=pki.webhook_client_ca,
        )
        (self.work_dir / "control-plane.txt").write_text("\n".join(cluster.describe()) + "\n")
        return cluster

    def _start_etcd(self) -> str:
        client_port, peer_port = free_port(), free_port()
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        args: list[str | Path] = [
            self.binaries["etcd"], "--name=e2e", f"--data-dir={self.work_dir / 'etcd-data'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=e2e={peer}", "--initial-cluster-state=new",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ]
        process = ManagedProcess.start("etcd", args, self.logs["etcd"])
        self.processes.append(process)

        session = requests.Session()
        session.trust_env = False

        def healthy() -> bool:
            reply = session.get(f"{client}/health", timeout=2)
            return reply.ok and reply.json().get("health") == "true"

        self._wait(time.monotonic() + 60, "etcd /health", healthy)
        return client

    def _start_apiserver(self, pki: Pki, etcd_url: str, port: int, admission: Path) -> None:
        args: list[str | Path] = [
            self.binaries["kube-apiserver"],
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",  # without it start-up fails on a host with no default route
            f"--secure-port={port}",
            f"--cert-dir={self.work_dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.client_ca}",
            f"--service-account-issuer=https://127.0.0.1:{port}/",
            f"--service-account-key-file={pki.sa_public}",
            f"--service-account-signing-key-file={pki.sa_private}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # The 'kubernetes' Service's endpoints may not be a loopback address; nothing here needs them.
            "--endpoint-reconciler-type=none",
            f"--admission-control-config-file={admission}",
        ]
        self.processes.append(ManagedProcess.start("kube-apiserver", args, self.logs["kube-apiserver"]))

    def _wait(self, deadline: float, what: str, ready: Any) -> None:
        last_error = ""
        while time.monotonic() < deadline:
            for process in self.processes:
                process.check_alive()
            try:
                if ready():
                    return
            except (requests.RequestException, ValueError) as exc:
                last_error = str(exc)
            time.sleep(0.25)
        logs = "\n".join(f"--- {p.name} ({p.log_path}):\n{tail(p.log_path, max_lines=40)}"
                         for p in self.processes)
        raise ControlPlaneError(
            f"timed out after {self.timeout:.0f}s waiting for {what} ({last_error})\n{logs}")

    def stop(self) -> None:
        # kube-apiserver first: it must not spin on a vanished etcd while shutting down.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


def existing_cluster(work_dir: Path, environ: Mapping[str, str] = os.environ) -> Cluster:
    """``PROMOTION_GATE_CLUSTER=kind``: the cluster of ``KUBECONFIG`` (e.g. ``kind create cluster``)."""
    kubeconfig = environ.get("KUBECONFIG", "")
    if not kubeconfig or not Path(kubeconfig.split(os.pathsep)[0]).is_file():
        raise ControlPlaneError(
            f"{CLUSTER_ENV}=kind uses an existing cluster: set KUBECONFIG to its kubeconfig "
            "(kind create cluster --kubeconfig ./var/kind.kubeconfig)")
    binaries = find_binaries(["kubectl", "helm"], environ)
    work_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(kind="kind", kubeconfig=Path(kubeconfig.split(os.pathsep)[0]), server="",
                      work_dir=work_dir, kubectl_path=binaries["kubectl"], helm_path=binaries["helm"],
                      versions=tool_versions(binaries))
    info = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    cluster.server_version = info.get("serverVersion", {}).get("gitVersion", "")
    config = yaml.safe_load(cluster.kubectl("config", "view", "--minify", "-o", "yaml").stdout)
    cluster.server = config["clusters"][0]["cluster"]["server"]
    (work_dir / "control-plane.txt").write_text("\n".join(cluster.describe()) + "\n")
    return cluster
