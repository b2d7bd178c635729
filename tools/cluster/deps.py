"""Prerequisites of the single-node cluster: Debian packages and the Go-built binaries.

A missing prerequisite is installed when it can be (Debian packages, as root) and otherwise reported
by name: nothing is ever skipped silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tools.cluster import config

# Debian package -> why the cluster needs it.
PACKAGES: dict[str, str] = {
    "containerd": "the container runtime (CRI) the kubelet drives",
    "runc": "the OCI runtime containerd starts containers with",
    "containernetworking-plugins": "CNI bridge, host-local and portmap plugins (Pod network)",
    "iptables": "kube-proxy's Service rules, the kubelet's and our FORWARD rules",
    "conntrack": "kube-proxy clears stale UDP conntrack entries with it",
    "iproute2": "the node bridge (ip link / ip addr)",
    "docker-registry": "the local image registry on loopback",
    "skopeo": "pushes image archives to the local registry by digest",
    "buildah": "builds the project image from its Dockerfile without Docker",
    "mmdebstrap": "makes the Debian bookworm base image (Python 3.11) without any registry",
    "busybox-static": "the static binary inside the per-run application image",
    "gcc": "compiles the pause image's static binary",
    "libc6-dev": "static libc for the pause binary",
    "postgresql": "the store's PostgreSQL server (a host process the Pods reach on the node address)",
    "openssl": "TLS checks in the fault scenarios",
}

# Go binaries from tools/build-toolchain.sh (`cluster` target), by their unversioned link names.
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy",
            "kubectl", "helm", "coredns")


class MissingPrerequisite(RuntimeError):
    """Something the cluster needs is not there and could not be installed."""


def missing_packages(packages: Iterable[str] = PACKAGES) -> list[str]:
    missing = []
    for package in packages:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


def ensure_packages(packages: Iterable[str] = PACKAGES, *, install: bool = True) -> None:
    missing = missing_packages(packages)
    if not missing:
        return
    if not install or os.geteuid() != 0:
        raise MissingPrerequisite(
            "the single-node cluster needs the Debian packages " + ", ".join(missing)
            + " (" + "; ".join(f"{p}: {PACKAGES.get(p, '')}" for p in missing) + "). Install them with: "
            + "apt-get install -y --no-install-recommends " + " ".join(missing))
    print(f"[cluster] installing Debian packages: {' '.join(missing)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingPrerequisite(f"apt-get install {' '.join(missing)} failed:\n{result.stdout[-2000:]}"
                                  f"{result.stderr[-2000:]}")
    still = missing_packages(missing)
    if still:
        raise MissingPrerequisite(f"Debian packages still missing after apt-get install: {', '.join(still)}")


def find_binaries(names: Sequence[str] = BINARIES) -> dict[str, Path]:
    """Each Go-built binary from the toolchain cache; one error naming every missing one."""
    directory = config.bin_dir()
    found: dict[str, Path] = {}
    missing = []
    for name in names:
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            found[name] = path.resolve()
        else:
            missing.append(name)
    if missing:
        raise MissingPrerequisite(
            f"the single-node cluster needs {', '.join(missing)}, not found in {directory}. Build them with "
            "`tools/build-toolchain.sh cluster` (or `make e2e-cluster`, which does it): pinned Go modules, "
            "cached outside the repository.")
    return found


def system_binary(name: str) -> Path:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise MissingPrerequisite(f"{name} not found on PATH (run `python -m tools.cluster deps`)")
    return Path(path)


def postgres_bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise MissingPrerequisite("PostgreSQL server binaries not found (Debian package postgresql)")
    return found[-1].parent


def check_root() -> None:
    if os.geteuid() != 0:
        raise MissingPrerequisite("the single-node cluster needs root (network namespaces, iptables, mounts)")
