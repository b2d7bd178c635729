"""The real Kubernetes API server of the end-to-end tests.

It lives in ``tools/control_plane.py`` because the benchmarks start one too (``make bench``'s scan
scenario) and the tools never import the tests; the fixtures in ``conftest.py`` import it from here.
"""

from tools.control_plane import (
    CLUSTER_ENV,
    Cluster,
    ClusterKind,
    ControlPlaneError,
    LocalControlPlane,
    ManagedProcess,
    Pki,
    ToolchainMissing,
    cluster_kind,
    existing_cluster,
    find_binaries,
    size,
    tail,
    tool_versions,
    toolchain_dir,
    write_kubeconfig,
)

__all__ = ["CLUSTER_ENV", "Cluster", "ClusterKind", "ControlPlaneError", "LocalControlPlane", "ManagedProcess", "Pki",
           "ToolchainMissing", "cluster_kind", "existing_cluster", "find_binaries", "size", "tail", "tool_versions",
           "toolchain_dir", "write_kubeconfig"]
