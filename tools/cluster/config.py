"""Where the single-node cluster lives: addresses, ports, paths and the cache (one place for all of it).

Every address and port is our own, so the cluster never clashes with the loopback control plane of
``tests/e2e`` (free loopback ports) or with other local servers: the node sits on its own bridge
``pgnode0`` (10.244.0.1); the host-side ports are fixed ones below 32768, outside the range the
kernel hands out for free ports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")
ETCD_VERSION = os.environ.get("ETCD_VERSION", "v3.6.16")
HELM_VERSION = os.environ.get("HELM_VERSION", "v3.22.0")
COREDNS_VERSION = os.environ.get("COREDNS_VERSION", "v1.14.7")

BRIDGE = "pgnode0"
NODE_IP = "10.244.0.1"
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
NODE_NAME = "node-1"
CLUSTER_DOMAIN = "cluster.local"

ETCD_CLIENT_PORT = 22379
ETCD_PEER_PORT = 22380
APISERVER_PORT = 16443
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 20248
CONTROLLER_MANAGER_PORT = 20257
SCHEDULER_PORT = 20259
PROXY_METRICS_PORT = 20249
PROXY_HEALTHZ_PORT = 20256
REGISTRY_PORT = 15000
POSTGRES_PORT = 15432

REGISTRY = f"127.0.0.1:{REGISTRY_PORT}"
PAUSE_IMAGE = f"{REGISTRY}/pause:3.10"

# Components, in start order (teardown is the reverse).
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd",
              "kubelet", "kube-proxy", "coredns", "registry", "postgres")


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """The toolchain's versioned cache (same precedence as tools/build-toolchain.sh and the Makefile)."""
    root = environ.get("PROMOTION_GATE_CACHE") or str(
        Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promotion-gate")
    return Path(root)


def bin_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return cache_root(environ) / "bin"


def image_cache(environ: Mapping[str, str] = os.environ) -> Path:
    return cache_root(environ) / "images"


def node_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The cluster's state (etcd data, containerd root, logs, PKI): removed by ``down``."""
    return Path(environ.get("PROMOTION_GATE_NODE_DIR") or "/var/tmp/promotion-gate-node")


@dataclass(frozen=True)
class Layout:
    """Absolute paths under the node directory (the kubelet, containerd and CNI need absolute ones)."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def state_file(self) -> Path:
        """What ``up`` changed on the host, so that ``down`` can undo exactly that."""
        return self.root / "host-state.json"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def containerd(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def cni(self) -> Path:
        return self.root / "cni"

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def volumes(self) -> Path:
        """hostPath PersistentVolumes (there is no provisioner)."""
        return self.root / "volumes"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.pids / f"{component}.pid"
