"""How to reach the Kubernetes API server: a kubeconfig, or the pod's service account.

Resolved once at start-up by each shell (``operator``, ``scan``, ``trace``, ``serve --kubernetes``)
and passed in. Every client built here answers within a deadline and never retries on its own:
a command must end in bounded time, and the operator's loops retry with their own backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class KubeAccess:
    """A kubeconfig file, or ``None`` for the pod's service account (in-cluster)."""

    kubeconfig: str | None

    def describe(self) -> str:
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster service account"

    def client_configuration(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        if self.kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration,
                                    persist_config=False)
        # One attempt per request: urllib3 would otherwise retry a timed-out read three times.
        configuration.retries = False
        return configuration

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(configuration=self.client_configuration())


def resolve(kubeconfig: str | None, environ: Mapping[str, str]) -> KubeAccess:
    """--kubeconfig, else $KUBECONFIG, else the pod's service account in a cluster, else ~/.kube/config."""
    if kubeconfig:
        return KubeAccess(kubeconfig)
    if environ.get("KUBECONFIG"):
        return KubeAccess(environ["KUBECONFIG"].split(":")[0])
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeAccess(None)
    return KubeAccess(str(Path("~/.kube/config").expanduser()))


def configured(kubeconfig: str | None, environ: Mapping[str, str]) -> KubeAccess | None:
    """Cluster access only when something names it (a flag, $KUBECONFIG, a pod, an existing ~/.kube/config)."""
    access = resolve(kubeconfig, environ)
    if access.kubeconfig is not None and not kubeconfig and not environ.get("KUBECONFIG") \
            and not Path(access.kubeconfig).is_file():
        return None
    return access
