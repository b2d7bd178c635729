"""A single-node Kubernetes cluster whose Pods really run, without Docker: bring it up, tear it down.

What runs (all host processes, each started here and stopped by the pid recorded in ``pids/``):

| component | listens on |
|---|---|
| etcd | 127.0.0.1:22379 (peer 22380) |
| kube-apiserver | 10.244.0.1:16443 (the node bridge: Pods reach it through the ``kubernetes`` Service) |
| kube-controller-manager, kube-scheduler | 127.0.0.1:20257, 127.0.0.1:20259 |
| containerd (own config, own socket under the node directory) | unix socket only |
| kubelet | 10.244.0.1:10250, healthz 127.0.0.1:20248 |
| kube-proxy (iptables mode) | metrics 127.0.0.1:20249, healthz 127.0.0.1:20256 |
| CoreDNS (trimmed build, host process) | 10.244.0.1:53 |
| docker-registry (own config) | 127.0.0.1:15000 |
| PostgreSQL (the store the chart's defaults expect; optional) | 10.244.0.1:15432 |

Pods live on bridge ``pgnode0`` (10.244.0.0/16), Services in 10.96.0.0/24. Pod traffic never leaves
the machine: no masquerade, no default route in Pods, FORWARD drops between the bridge and any other
interface, CoreDNS has no upstream. ``down`` undoes every change ``up`` made to the host (processes,
shims, mounts, network namespaces, the bridge, iptables chains, sysctls, cgroups, host paths); what it
must undo is recorded in ``host-state.json`` before anything is changed.

The recipe, pitfalls included, is ../shared/reference/single-node-cluster.md; docs/e2e.md describes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.cluster import config, deps, images
from tools.cluster.config import Layout
from tools.cluster.pki import Pki

START_TIMEOUT = 180.0
COMMENT = "promotion-gate-node"

# Sysctls the kubelet, kube-proxy or the CNI bridge plugin may change; restored by ``down``.
SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)

# Written by the kubelet, the controller-manager, containerd, CNI, skopeo and buildah whatever their
# root directories say; removed by ``down`` when ``up`` found them absent.
HOST_PATHS = (
    "/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/usr/libexec/kubernetes", "/var/lib/cni",
    "/run/containerd", "/run/netns", "/var/lib/containers", "/etc/kubernetes",
)

IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("filter", "nat", "mangle")


class ClusterError(RuntimeError):
    """A component did not come up; the message carries the tail of its log."""


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text[-lines:])


def sh(*args: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(str(a) for a in args)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


# --- host state ----------------------------------------------------------------------------------


def read_sysctl(name: str) -> str | None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    with contextlib.suppress(OSError):
        path.write_text(value)


def iptables_chains(binary: str, table: str) -> list[str]:
    result = sh(binary, "-w", "5", "-t", table, "-S", check=False)
    return sorted({line.split()[1] for line in result.stdout.splitlines() if line.startswith("-N ")})


def netns_entries() -> list[str]:
    directory = Path("/run/netns")
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@dataclass
class HostState:
    """What the host looked like before ``up``: ``down`` restores exactly this."""

    sysctls: dict[str, str] = field(default_factory=dict)
    existing_paths: list[str] = field(default_factory=list)
    chains: dict[str, list[str]] = field(default_factory=dict)  # "iptables/nat" -> chains before
    netns: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    @classmethod
    def capture(cls) -> HostState:
        state = cls()
        for name in SYSCTLS:
            value = read_sysctl(name)
            if value is not None:
                state.sysctls[name] = value
        state.existing_paths = [p for p in HOST_PATHS if os.path.lexists(p)]
        for binary in IPTABLES:
            for table in IPTABLES_TABLES:
                state.chains[f"{binary}/{table}"] = iptables_chains(binary, table)
        state.netns = netns_entries()
        state.cgroups = [str(p) for p in kubepods_cgroups()]
        return state

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> HostState:
        return cls(**json.loads(path.read_text()))


def kubepods_cgroups() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    found = [root / "kubepods"] if (root / "kubepods").is_dir() else []
    found += [p for p in root.glob("*/kubepods") if p.is_dir()]
    return found


# --- processes -----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        if status.read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stop_pid(pid: int, name: str, *, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; this pid only."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            break
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    else:
        log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not pid_alive(pid):
                break
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line contains ``needle`` (e.g. our containerd socket, for the shims)."""
    found = []
    for entry in Path("/proc").iterdir():
        if (entry.name.isdigit() and int(entry.name) != os.getpid()
                and any(needle in part for part in cmdline(int(entry.name)))):
            found.append(int(entry.name))
    return found


# --- the cluster ---------------------------------------------------------------------------------


class Node:
    """``up()`` starts everything in order; ``down()`` stops and undoes everything, even after a failed up."""

    def __init__(self, root: Path | None = None, *, with_postgres: bool = True) -> None:
        self.layout = Layout(root or config.node_dir())
        self.with_postgres = with_postgres
        self._binaries: dict[str, Path] | None = None

    @property
    def binaries(self) -> dict[str, Path]:
        if self._binaries is None:
            self._binaries = deps.find_binaries()
        return self._binaries

    @property
    def kubeconfig(self) -> Path:
        return self.layout.admin_kubeconfig

    @property
    def server(self) -> str:
        return f"https://{config.NODE_IP}:{config.APISERVER_PORT}"

    def postgres_dsn(self, database: str = "promotion_gate") -> str:
        return f"postgresql://promotion_gate:promotion-gate-node@{config.NODE_IP}:{config.POSTGRES_PORT}/{database}"

    # -- bring up ------------------------------------------------------------------------------

    def up(self) -> None:
        deps.check_root()
        self.binaries  # noqa: B018 - fail early, naming every missing binary
        if self.layout.state_file.exists():
            log(f"a previous cluster left state in {self.layout.root}: tearing it down first")
            self.down()
        started = time.monotonic()
        root = self.layout.root
        if root.exists():
            shutil.rmtree(root)
        for directory in (root, self.layout.logs, self.layout.pids, self.layout.volumes):
            directory.mkdir(parents=True, exist_ok=True)
        HostState.capture().save(self.layout.state_file)
        try:
            self._network()
            pki = Pki(self.layout.pki)
            pki.generate()
            self._kubeconfigs(pki)
            self._start_registry()
            if self.with_postgres:
                self._start_postgres()
            self._start_etcd()
            self._start_apiserver()
            self._start("kube-controller-manager", self._controller_manager_args())
            self._start("kube-scheduler", self._scheduler_args())
            self._start_containerd()
            self._push_pause()
            self._start_kubelet()
            self._start_proxy()
            self._start_coredns()
            self._wait_node_ready()
        except BaseException:
            log("start-up failed: tearing down what was started")
            self.down()
            raise
        (root / "up-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        log(f"cluster up in {time.monotonic() - started:.1f}s; KUBECONFIG={self.kubeconfig}")

    def _network(self) -> None:
        bridge = config.BRIDGE
        if sh("ip", "link", "show", bridge, check=False).returncode != 0:
            sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "replace", f"{config.NODE_IP}/16", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        # The host reaches ClusterIPs (kube-proxy's OUTPUT rules) through the bridge, from the node IP.
        sh("ip", "route", "replace", config.SERVICE_CIDR, "dev", bridge, "src", config.NODE_IP)
        # Nothing on the bridge may be forwarded to another interface, nor the other way round.
        for direction in (["-i", bridge, "!", "-o", bridge], ["-o", bridge, "!", "-i", bridge]):
            sh("iptables", "-w", "5", "-I", "FORWARD", "1", *direction, "-m", "comment", "--comment", COMMENT,
               "-j", "DROP")
        write_sysctl("net.bridge.bridge-nf-call-iptables", "1")

    def _kubeconfigs(self, pki: Pki) -> None:
        pki.kubeconfig("admin", self.layout.admin_kubeconfig)
        for identity in ("controller-manager", "scheduler", "kubelet", "kube-proxy", "coredns"):
            pki.kubeconfig(identity, self.layout.pki / f"{identity}.kubeconfig")

    def _start(self, name: str, args: Sequence[str | Path], *, env: dict[str, str] | None = None,
               user: str | None = None) -> int:
        log_path = self.layout.log(name)
        command = [str(a) for a in args]
        with log_path.open("ab") as handle:
            if user is not None:
                shutil.chown(log_path, user)
            # Its own session: the process outlives the command that ran `up`; stopped by its pid.
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, **(env or {})},
                                       cwd=self.layout.root, user=user, group=user)
        self.layout.pid_file(name).write_text(f"{process.pid}\n")
        return process.pid

    def _pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.layout.pid_file(name).read_text().strip())
        return None

    def _check_alive(self, names: Sequence[str]) -> None:
        for name in names:
            pid = self._pid(name)
            if pid is not None and not pid_alive(pid):
                raise ClusterError(f"{name} exited during start-up:\n{tail(self.layout.log(name))}")

    def _wait(self, what: str, ready: Callable[[], bool], *, timeout: float = START_TIMEOUT,
              watch: Sequence[str] = ()) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(watch)
            try:
                if ready():
                    return
            except (OSError, urllib.error.URLError, ValueError, subprocess.SubprocessError) as exc:
                last = str(exc)
            time.sleep(0.3)
        logs = "\n".join(f"--- {n}:\n{tail(self.layout.log(n))}" for n in watch)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} ({last})\n{logs}")

    def _https_ok(self, url: str, *, client: str = "admin") -> bool:
        context = ssl.create_default_context(cafile=str(self.layout.pki / "ca.crt"))
        context.load_cert_chain(str(self.layout.pki / f"{client}.crt"), str(self.layout.pki / f"{client}.key"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
        with opener.open(url, timeout=5) as answer:
            return bool(answer.status == 200)

    def _http_ok(self, url: str) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as answer:
            return bool(answer.status == 200)

    # etcd, API server, controllers

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{config.ETCD_CLIENT_PORT}"
        peer = f"http://127.0.0.1:{config.ETCD_PEER_PORT}"
        self._start("etcd", [
            self.binaries["etcd"], "--name=node", f"--data-dir={self.layout.root / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=node={peer}", "--initial-cluster-state=new", "--unsafe-no-fsync=true",
            "--log-level=warn",
        ])

        def healthy() -> bool:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"{client}/health", timeout=2) as answer:
                return bool(json.load(answer).get("health") == "true")

        self._wait("etcd /health", healthy, watch=["etcd"], timeout=60)

    def _start_apiserver(self) -> None:
        pki = self.layout.pki
        self._start("kube-apiserver", [
            self.binaries["kube-apiserver"],
            f"--etcd-servers=http://127.0.0.1:{config.ETCD_CLIENT_PORT}",
            f"--bind-address={config.NODE_IP}", f"--advertise-address={config.NODE_IP}",
            f"--secure-port={config.APISERVER_PORT}",
            f"--cert-dir={self.layout.root / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-issuer=https://kubernetes.default.svc.{config.CLUSTER_DOMAIN}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={config.SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            # Webhook calls go straight to a Pod IP of the Service's endpoints (the API server does not
            # depend on kube-proxy's rules for its own traffic).
            "--enable-aggregator-routing=true",
            "--profiling=false",
        ])
        self._wait("kube-apiserver /readyz", lambda: self._https_ok(f"{self.server}/readyz"),
                   watch=["etcd", "kube-apiserver"])

    def _controller_manager_args(self) -> list[str | Path]:
        pki = self.layout.pki
        return [
            self.binaries["kube-controller-manager"],
            f"--kubeconfig={pki / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={pki / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={pki / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={config.CONTROLLER_MANAGER_PORT}",
            f"--cert-dir={self.layout.root / 'controller-manager-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            f"--service-cluster-ip-range={config.SERVICE_CIDR}", "--allocate-node-cidrs=false",
            f"--flex-volume-plugin-dir={self.layout.kubelet / 'volume-plugins'}",
            "--profiling=false",
        ]

    def _scheduler_args(self) -> list[str | Path]:
        pki = self.layout.pki
        return [
            self.binaries["kube-scheduler"],
            f"--kubeconfig={pki / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={pki / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={pki / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={config.SCHEDULER_PORT}",
            f"--cert-dir={self.layout.root / 'scheduler-certs'}", "--leader-elect=false", "--profiling=false",
        ]

    # container runtime, kubelet, proxy, DNS

    def _start_containerd(self) -> None:
        c = self.layout.containerd
        for directory in (c / "root", c / "state", c / "opt", c / "certs.d" / config.REGISTRY,
                          self.layout.cni / "net.d", self.layout.cni / "ipam"):
            directory.mkdir(parents=True, exist_ok=True)
        (c / "certs.d" / config.REGISTRY / "hosts.toml").write_text(
            f'server = "http://{config.REGISTRY}"\n\n'
            f'[host."http://{config.REGISTRY}"]\n  capabilities = ["pull", "resolve"]\n')
        (c / "config.toml").write_text(f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.layout.containerd_socket}"

[ttrpc]
  address = "{self.layout.containerd_socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{config.PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_unprivileged_ports = false
  # This machine withholds CAP_SYS_RESOURCE: a negative oom_score_adj (sandboxes get -998) cannot be
  # set, and runc fails with "can't get final child's PID from pipe: EOF". Clamp to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{deps.system_binary('runc')}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.layout.cni / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{c / 'certs.d'}"
""")
        (self.layout.cni / "net.d" / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": config.BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local",
                          "ranges": [[{"subnet": config.POD_CIDR, "gateway": config.NODE_IP}]],
                          # Only the Service range: no default route, nothing leaves the machine.
                          "routes": [{"dst": config.SERVICE_CIDR, "gw": config.NODE_IP}],
                          "dataDir": str(self.layout.cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))
        self._start("containerd", [deps.system_binary("containerd"), "--config", c / "config.toml"])
        self._wait("containerd socket", lambda: self._ctr("version").returncode == 0, watch=["containerd"], timeout=60)

    def _ctr(self, *args: str, namespace: str = "k8s.io", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.layout.containerd_socket), "--namespace", namespace,
                               *args], capture_output=True, text=True, timeout=timeout)

    def _push_pause(self) -> None:
        # containerd pulls its sandbox image before the first Pod; from the local registry, by name.
        pause = images.pause_image()
        images.push(pause, config.PAUSE_IMAGE)

    def _start_kubelet(self) -> None:
        k = self.layout.kubelet
        for directory in (k / "root", k / "pod-logs", k / "volume-plugins"):
            directory.mkdir(parents=True, exist_ok=True)
        # dnsPolicy: Default Pods get this file: never the host's resolver, which is off the machine.
        (k / "resolv.conf").write_text(f"nameserver {config.NODE_IP}\n")
        pki = self.layout.pki
        (k / "config.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{self.layout.containerd_socket}
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
address: {config.NODE_IP}
port: {config.KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {config.KUBELET_HEALTHZ_PORT}
tlsCertFile: {pki / 'kubelet-serving.crt'}
tlsPrivateKeyFile: {pki / 'kubelet-serving.key'}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {pki / 'ca.crt'}}}
authorization:
  mode: Webhook
podLogsDir: {k / 'pod-logs'}
resolvConf: {k / 'resolv.conf'}
clusterDNS: ["{config.NODE_IP}"]
clusterDomain: {config.CLUSTER_DOMAIN}
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
maxPods: 60
volumePluginDir: {k / 'volume-plugins'}
# Secret and ConfigMap volumes follow their objects within seconds (certificate rotation tests).
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
protectKernelDefaults: false
""")
        self._start("kubelet", [
            self.binaries["kubelet"], f"--config={k / 'config.yaml'}",
            f"--kubeconfig={pki / 'kubelet.kubeconfig'}", f"--root-dir={k / 'root'}",
            f"--cert-dir={k / 'certs'}", f"--hostname-override={config.NODE_NAME}",
            f"--node-ip={config.NODE_IP}", "--v=1",
        ])
        self._wait("kubelet /healthz", lambda: self._http_ok(f"http://127.0.0.1:{config.KUBELET_HEALTHZ_PORT}/healthz"),
                   watch=["kubelet", "containerd"], timeout=90)

    def _start_proxy(self) -> None:
        self._start("kube-proxy", [
            self.binaries["kube-proxy"], f"--kubeconfig={self.layout.pki / 'kube-proxy.kubeconfig'}",
            "--proxy-mode=iptables", f"--hostname-override={config.NODE_NAME}",
            f"--cluster-cidr={config.POD_CIDR}", f"--nodeport-addresses={config.NODE_IP}/32",
            f"--metrics-bind-address=127.0.0.1:{config.PROXY_METRICS_PORT}",
            f"--healthz-bind-address=127.0.0.1:{config.PROXY_HEALTHZ_PORT}",
            # 0: leave the host's conntrack sysctls alone.
            "--conntrack-max-per-core=0", "--conntrack-min=0",
            "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
            "--masquerade-all=false", "--profiling=false",
        ])
        self._wait("kube-proxy /healthz", lambda: self._http_ok(f"http://127.0.0.1:{config.PROXY_HEALTHZ_PORT}/healthz"),
                   watch=["kube-proxy"], timeout=90)

    def _start_coredns(self) -> None:
        directory = self.layout.root / "coredns"
        directory.mkdir(exist_ok=True)
        # CoreDNS reads Services, EndpointSlices, Namespaces and Pods as user system:coredns.
        self.kubectl("apply", "-f", "-", input=COREDNS_RBAC)
        (directory / "Corefile").write_text(f"""{config.CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {config.NODE_IP}
    errors
    kubernetes {config.CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {self.layout.pki / 'coredns.kubeconfig'} node
        pods insecure
    }}
}}
.:53 {{
    bind {config.NODE_IP}
    # No upstream: names outside the cluster do not resolve (nothing may leave this machine).
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        self._start("coredns", [self.binaries["coredns"], "-conf", directory / "Corefile", "-dns.port", "53"])

        def answers() -> bool:
            reply = dns_query(config.NODE_IP, f"kubernetes.default.svc.{config.CLUSTER_DOMAIN}")
            return reply == config.KUBERNETES_SERVICE_IP

        self._wait("CoreDNS to answer kubernetes.default.svc", answers, watch=["coredns"], timeout=60)

    def _start_registry(self) -> None:
        directory = self.layout.registry
        (directory / "data").mkdir(parents=True, exist_ok=True)
        # Our own config: the Debian package's listens on every interface.
        (directory / "config.yml").write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {directory / 'data'}
  delete:
    enabled: true
http:
  addr: {config.REGISTRY}
  headers:
    X-Content-Type-Options: [nosniff]
""")
        self._start("registry", [deps.system_binary("docker-registry"), "serve", directory / "config.yml"])
        self._wait("registry /v2/", lambda: self._http_ok(f"http://{config.REGISTRY}/v2/"), watch=["registry"],
                   timeout=30)

    def _start_postgres(self) -> None:
        bin_dir = deps.postgres_bin_dir()
        data = self.layout.postgres / "data"
        run_dir = self.layout.postgres / "run"
        run_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.layout.postgres, "postgres")
            shutil.chown(run_dir, "postgres")
        password_file = self.layout.postgres / "password"
        password_file.write_text("promotion-gate-node\n")
        shutil.chown(password_file, "postgres")
        sh("runuser", "-u", "postgres", "--", bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
           "--no-sync", "-E", "UTF8", timeout=120)
        with (data / "pg_hba.conf").open("w") as hba:
            hba.write("local all all trust\nhost all all 127.0.0.1/32 trust\n"
                      f"host all all {config.POD_CIDR} scram-sha-256\n")
        self._start("postgres", [
            bin_dir / "postgres", "-D", data, "-p", str(config.POSTGRES_PORT), "-k", run_dir,
            "-c", f"listen_addresses=127.0.0.1,{config.NODE_IP}", "-c", "fsync=off", "-c", "max_connections=200",
            "-c", "password_encryption=scram-sha-256",
        ], user="postgres")

        def ready() -> bool:
            result = subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_isready"), "-h", str(run_dir),
                                     "-p", str(config.POSTGRES_PORT)], capture_output=True, timeout=10)
            return result.returncode == 0

        self._wait("PostgreSQL", ready, watch=["postgres"], timeout=60)
        self.psql("CREATE ROLE promotion_gate LOGIN PASSWORD 'promotion-gate-node'")
        self.psql("CREATE DATABASE promotion_gate OWNER promotion_gate")

    def psql(self, statement: str) -> str:
        bin_dir = deps.postgres_bin_dir()
        result = sh("runuser", "-u", "postgres", "--", bin_dir / "psql", "-h", self.layout.postgres / "run",
                    "-p", str(config.POSTGRES_PORT), "-U", "postgres", "-At", "-c", statement)
        return result.stdout

    def stop_postgres(self) -> None:
        """Stop the store's database (fault scenarios); ``start_postgres_again`` brings it back."""
        pid = self._pid("postgres")
        if pid is not None and pid_alive(pid):
            # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for the webhooks' pooled sessions).
            os.kill(pid, signal.SIGINT)
            stop_pid(pid, "postgres", grace=30)

    def start_postgres_again(self) -> None:
        bin_dir = deps.postgres_bin_dir()
        data = self.layout.postgres / "data"
        run_dir = self.layout.postgres / "run"
        self._start("postgres", [
            bin_dir / "postgres", "-D", data, "-p", str(config.POSTGRES_PORT), "-k", run_dir,
            "-c", f"listen_addresses=127.0.0.1,{config.NODE_IP}", "-c", "fsync=off", "-c", "max_connections=200",
        ], user="postgres")

        def ready() -> bool:
            result = subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_isready"), "-h", str(run_dir),
                                     "-p", str(config.POSTGRES_PORT)], capture_output=True, timeout=10)
            return result.returncode == 0

        self._wait("PostgreSQL", ready, watch=["postgres"], timeout=60)

    def _wait_node_ready(self) -> None:
        def ready() -> bool:
            result = self.kubectl("get", "node", config.NODE_NAME, "-o",
                                  "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
            return result.stdout.strip() == "True"

        self._wait(f"node {config.NODE_NAME} Ready", ready,
                   watch=["kube-apiserver", "kubelet", "containerd", "kube-controller-manager"])
        # ServiceAccount "default" (the controller-manager makes it) is needed before any Pod.
        self._wait("ServiceAccount default/default",
                   lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                   watch=["kube-controller-manager"])

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.binaries["kubectl"]), f"--kubeconfig={self.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    # -- tear down -----------------------------------------------------------------------------

    def down(self) -> None:
        """Stop everything and restore the host; safe to call twice and after a failed ``up``."""
        started = time.monotonic()
        layout = self.layout
        state = HostState.load(layout.state_file) if layout.state_file.exists() else None
        errors: list[str] = []
        pids = {name: pid for name in config.COMPONENTS if (pid := self._pid(name)) is not None}

        def attempt(what: str, action: Callable[[], object]) -> None:
            step = time.monotonic()
            try:
                action()
            except Exception as exc:  # teardown goes on: one failure must not leave the rest behind
                errors.append(f"{what}: {exc}")
            if time.monotonic() - step > 2:
                log(f"teardown: {what} took {time.monotonic() - step:.1f}s")

        # Stop the kubelet and kube-proxy first (they would restart containers or rewrite rules).
        for name in ("kube-proxy", "kubelet"):
            attempt(f"stop {name}", lambda n=name: self._stop(n))  # type: ignore[misc]
        if layout.containerd_socket.exists():
            attempt("kill containers", self._kill_containers)
        attempt("stop containerd", lambda: self._stop("containerd"))
        attempt("stop shims", self._kill_shims)
        attempt("kill leftover Pod processes", kill_kubepods_processes)
        for name in ("coredns", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd",
                     "registry", "postgres"):
            attempt(f"stop {name}", lambda n=name: self._stop(n))  # type: ignore[misc]
        if "kube-proxy" in (self._binaries or {}) or (config.bin_dir() / "kube-proxy").exists():
            attempt("kube-proxy --cleanup", lambda: subprocess.run(
                [str(config.bin_dir() / "kube-proxy"), "--cleanup", "--proxy-mode=iptables"],
                capture_output=True, timeout=60))
        attempt("unmount", lambda: unmount_under([str(layout.root)]))
        if state is not None:
            attempt("network namespaces", lambda: remove_netns(state.netns))
            attempt("iptables", lambda: restore_iptables(state.chains))
            attempt("cgroups", lambda: remove_cgroups(state.cgroups))
        attempt("bridge", lambda: sh("ip", "link", "delete", config.BRIDGE) if sh(
            "ip", "link", "show", config.BRIDGE, check=False).returncode == 0 else None)
        attempt("FORWARD rules", remove_comment_rules)
        if state is not None:
            attempt("sysctls", lambda: restore_sysctls(state.sysctls))
            attempt("host paths", lambda: remove_host_paths(state.existing_paths))
        if layout.root.exists():
            attempt("node directory", lambda: shutil.rmtree(layout.root))
        errors += leftovers(pids, state, layout.root)
        log(f"cluster down in {time.monotonic() - started:.1f}s")
        if errors:
            raise ClusterError("teardown incomplete:\n" + "\n".join(errors))

    def _stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        # The pid file may be stale (a reboot, a reused pid): only stop the process we started.
        binary = {"registry": "docker-registry", "postgres": "postgres", "containerd": "containerd"}.get(name, name)
        if pid_alive(pid) and any(binary in part for part in cmdline(pid)[:1]):
            if name == "postgres":
                os.kill(pid, signal.SIGINT)  # fast shutdown: do not wait for clients to disconnect
            stop_pid(pid, name, grace=30 if name in ("containerd", "postgres") else 15)
        self.layout.pid_file(name).unlink(missing_ok=True)

    def _kill_containers(self) -> None:
        pid = self._pid("containerd")
        if pid is None or not pid_alive(pid):
            return
        def listed() -> list[str]:
            return self._ctr("tasks", "ls", "-q").stdout.split()

        for task in listed():
            self._ctr("tasks", "kill", "--signal", "SIGKILL", task)
        deadline = time.monotonic() + 20
        # containerd's CRI plugin deletes an exited task itself; whatever it has not, we delete.
        while (remaining := listed()) and time.monotonic() < deadline:
            for task in remaining:
                self._ctr("tasks", "delete", task)
            time.sleep(0.2)
        for container in self._ctr("containers", "ls", "-q").stdout.split():
            self._ctr("containers", "delete", container)

    def _kill_shims(self) -> None:
        # Shims are re-parented to PID 1 and outlive containerd; each one names our socket.
        for pid in processes_mentioning(str(self.layout.containerd_socket)):
            stop_pid(pid, "containerd-shim", grace=5)


COREDNS_RBAC = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: system:coredns
"""


def dns_query(server: str, name: str, timeout: float = 2.0) -> str | None:
    """The first A record for ``name`` from ``server`` (a minimal DNS client: no resolver config involved)."""
    import random
    import socket
    import struct

    query_id = random.randrange(65536)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        reply, _ = sock.recvfrom(4096)
    answer_id, flags, _, answers = struct.unpack(">HHHH", reply[:8])
    if answer_id != query_id or flags & 0x000F or answers == 0:
        return None
    offset = 12 + len(question) + 4
    for _ in range(answers):
        if reply[offset] & 0xC0 == 0xC0:
            offset += 2
        else:
            while reply[offset]:
                offset += reply[offset] + 1
            offset += 1
        rtype, _, _, length = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            return socket.inet_ntoa(reply[offset:offset + 4])
        offset += length
    return None


def leftovers(pids: dict[str, int], state: HostState | None, root: Path) -> list[str]:
    """What a teardown left behind, if anything: each line names it."""
    found = [f"{name} (pid {pid}) still running" for name, pid in pids.items() if pid_alive(pid)]
    found += [f"process {pid} still refers to {root}: {' '.join(cmdline(pid))[:120]}"
              for pid in processes_mentioning(str(root))]
    if sh("ip", "link", "show", config.BRIDGE, check=False).returncode == 0:
        found.append(f"interface {config.BRIDGE} still exists")
    found += [f"mount {m}" for m in mounts() if m.startswith(str(root))]
    if state is not None:
        for binary in IPTABLES:
            for table in IPTABLES_TABLES:
                before = set(state.chains.get(f"{binary}/{table}", []))
                found += [f"{binary} -t {table} chain {c}" for c in iptables_chains(binary, table) if c not in before]
        found += [f"network namespace {n}" for n in netns_entries() if n not in state.netns]
        found += [f"sysctl {n}={read_sysctl(n)} (was {v})" for n, v in state.sysctls.items() if read_sysctl(n) != v]
        found += [f"cgroup {c}" for c in kubepods_cgroups() if str(c) not in state.cgroups]
        found += [f"path {p}" for p in HOST_PATHS if p not in state.existing_paths and os.path.lexists(p)]
    for rule in sh("iptables", "-w", "5", "-S", check=False).stdout.splitlines():
        if COMMENT in rule:
            found.append(f"iptables rule {rule}")
    return found


def kill_kubepods_processes() -> None:
    """Any process still in a Pod cgroup (its shim was gone): SIGKILL, by pid."""
    for root in kubepods_cgroups():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for line in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line), signal.SIGKILL)


def mounts() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.append(line.split()[4].replace("\\040", " "))
    return points


def unmount_under(prefixes: Sequence[str]) -> None:
    for _ in range(3):
        targets = [m for m in mounts() if any(m.startswith(p) for p in prefixes)]
        if not targets:
            return
        for target in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


def remove_netns(before: Sequence[str]) -> None:
    for name in netns_entries():
        if name not in before and name.startswith("cni-"):
            path = Path("/run/netns") / name
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
            with contextlib.suppress(OSError):
                path.unlink()


def restore_iptables(before: dict[str, list[str]]) -> None:
    """Delete the chains that appeared since ``up`` and every rule that jumps to one of them."""
    for binary in IPTABLES:
        for table in IPTABLES_TABLES:
            existed = set(before.get(f"{binary}/{table}", []))
            new = [c for c in iptables_chains(binary, table) if c not in existed]
            if not new:
                continue
            rules = sh(binary, "-w", "5", "-t", table, "-S", check=False).stdout.splitlines()
            for rule in rules:
                parts = rule.split()
                if parts[:1] == ["-A"] and parts[1] not in new and any(
                        parts[i] in ("-j", "-g") and parts[i + 1] in new for i in range(len(parts) - 1)):
                    subprocess.run([binary, "-w", "5", "-t", table, "-D", *parts[1:]], capture_output=True)
            for chain in new:
                subprocess.run([binary, "-w", "5", "-t", table, "-F", chain], capture_output=True)
            for chain in new:
                subprocess.run([binary, "-w", "5", "-t", table, "-X", chain], capture_output=True)


def remove_comment_rules() -> None:
    for binary in IPTABLES:
        for table in IPTABLES_TABLES:
            for rule in sh(binary, "-w", "5", "-t", table, "-S", check=False).stdout.splitlines():
                if COMMENT in rule and rule.startswith("-A "):
                    parts = rule.split()
                    args = [p.strip('"') for p in parts[1:]]
                    subprocess.run([binary, "-w", "5", "-t", table, "-D", *args], capture_output=True)


def remove_cgroups(before: Sequence[str]) -> None:
    for root in kubepods_cgroups():
        if str(root) in before:
            continue
        directories = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*directories, root]:
            with contextlib.suppress(OSError):
                directory.rmdir()


def restore_sysctls(before: dict[str, str]) -> None:
    for name, value in before.items():
        if read_sysctl(name) != value:
            write_sysctl(name, value)


def remove_host_paths(existing: Sequence[str]) -> None:
    for path in HOST_PATHS:
        if path in existing or not os.path.lexists(path):
            continue
        unmount_under([path])
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_node(root: Path | None = None, *, with_postgres: bool = True) -> Iterator[Node]:
    node = Node(root, with_postgres=with_postgres)
    node.up()
    try:
        yield node
    finally:
        node.down()
