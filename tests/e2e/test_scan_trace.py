"""``trace DIGEST`` answers "where does it run now?" next to its records: from the record API of a server
with cluster access (``GET /api/v1/running/<digest>``), or from the CLI's own kubeconfig.

The digest runs in a Deployment's two Pods by name, and in a third Pod whose image is a tag that the
container runtime resolved to the same digest (``status.containerStatuses[].imageID``): the tag hides
it from a search by image, not from ``trace``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e import running_workloads as rw
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import register_logs, unregister_logs
from tools.promotion_kit import Kit, make_kit
from tools.servers import RunningServer, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def serve(cluster: Cluster, directory: Path, kit: Kit, store: str, config: pytest.Config, *,
          kubernetes: bool) -> RunningServer:
    server = start_server(directory, policy=kit.policy_path.read_text(), store=store,
                          extra=["--kubernetes"] if kubernetes else [], env={"KUBECONFIG": str(cluster.kubeconfig)})
    register_logs(config, {f"server {directory.name}": server.log_path})
    return server


def test_trace_shows_where_the_digest_runs_now(cluster: Cluster, core: Any, apps: Any, namespaces: rw.Namespaces,
                                               kit: Kit, store: str, tmp_path: Path,
                                               pytestconfig: pytest.Config) -> None:
    digest = "sha256:" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    image = f"ghcr.io/acme/payment-api@{digest}"
    rw.promote_to_production(cluster, kit, store, image)
    ns = namespaces.create("e2e-scan-trace")
    deployed = rw.deployment(apps, core, ns, "payment-api", {"api": image}, replicas=2)
    rw.run_pod(core, ns, "debug", {"shell": "ghcr.io/acme/payment-api:1.4"}, started="2026-11-25T11:30:00Z",
               image_ids={"shell": f"ghcr.io/acme/payment-api@{digest}"})
    expected = {
        "digest": digest, "pods": 3, "truncated": 0,
        "workloads": [
            {"namespace": ns, "kind": "Deployment", "name": "payment-api", "since": rw.STARTED, "pods": 2,
             "containers": [{"pod": pod, "node": "node-1", "container": "api", "image": image, "since": rw.STARTED,
                             "matchedBy": "image"} for pod in deployed.pods]},
            {"namespace": ns, "kind": "Pod", "name": "debug", "since": "2026-11-25T11:30:00Z", "pods": 1,
             "containers": [{"pod": "debug", "node": "node-1", "container": "shell",
                             "image": "ghcr.io/acme/payment-api:1.4", "since": "2026-11-25T11:30:00Z",
                             "matchedBy": "imageID"}]},
        ],
    }
    running_lines = [
        "running now (observed {observed}): 3 pod(s)",
        f"  {ns}: Deployment payment-api, 2 pod(s) since {rw.STARTED}",
        *(f'      pod {pod} on node-1, container "api" since {rw.STARTED}' for pod in deployed.pods),
        f"  {ns}: Pod debug, 1 pod(s) since 2026-11-25T11:30:00Z",
        '      pod debug on node-1, container "shell" since 2026-11-25T11:30:00Z (tag "ghcr.io/acme/payment-api:1.4" '
        "resolved to it)",
    ]

    server = serve(cluster, tmp_path / "with-cluster", kit, store, pytestconfig, kubernetes=True)
    try:
        reader = {"Authorization": f"Bearer {kit.token('reader')}"}
        answer = requests.get(f"{server.url}/api/v1/running/{digest}", headers=reader, verify=str(server.ca),
                              timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert {k: v for k, v in body.items() if k != "observedAt"} == expected
        assert requests.get(f"{server.url}/api/v1/running/{digest}", verify=str(server.ca), timeout=30).json() == {
            "error": "authentication required: send 'Authorization: Bearer <token>'", "code": 401}
        assert requests.get(f"{server.url}/api/v1/running/sha256:abc", headers=reader, verify=str(server.ca),
                            timeout=30).json() == {
            "error": "digest 'sha256:abc' is not sha256:<64 hex> or sha512:<128 hex>", "code": 400}

        remote = ["--server", server.url, "--ca-file", str(server.ca), "--token-file", str(kit.token_file("reader"))]
        traced = rw.cli(cluster, "trace", image, *remote, kubeconfig=tmp_path / "no-such-kubeconfig")
        assert traced.returncode == 0, traced.stderr
        lines = traced.stdout.splitlines()
        start = lines.index(next(line for line in lines if line.startswith("running now")))
        observed = lines[start].split("(observed ")[1].split(")")[0]
        assert lines[start:] == [line.format(observed=observed) for line in running_lines]
        assert lines[start - 1] == "admissions: 0"
    finally:
        server.stop()
        unregister_logs(pytestconfig, ["server with-cluster"])

    # A server without cluster access says so; the CLI then lists the cluster itself, with its kubeconfig.
    blind = serve(cluster, tmp_path / "blind", kit, store, pytestconfig, kubernetes=False)
    try:
        refused = requests.get(f"{blind.url}/api/v1/running/{digest}", verify=str(blind.ca), timeout=30,
                               headers={"Authorization": f"Bearer {kit.token('reader')}"})
        assert (refused.status_code, refused.json()["error"]) == (404, (
            "this server has no Kubernetes access, so it cannot say where a digest runs; run it with --kubernetes "
            "(the chart does), or run 'promotion-gate trace' with a kubeconfig"))
        remote = ["--server", blind.url, "--ca-file", str(blind.ca), "--token-file", str(kit.token_file("reader"))]
        own = rw.cli(cluster, "trace", digest, *remote, "--output", "json")
        assert own.returncode == 0, own.stderr
        listed = json.loads(own.stdout)["running"]
        assert {k: v for k, v in listed.items() if k != "observedAt"} == expected
        without = rw.cli(cluster, "trace", digest, *remote, "--no-cluster")
        assert "running now" not in without.stdout
    finally:
        blind.stop()
        unregister_logs(pytestconfig, ["server blind"])
