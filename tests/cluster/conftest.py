"""Fixtures of the cluster scenarios: a real single-node cluster, the project image, the chart installed.

Lifetimes: one node (``tools.cluster``), one project image and one Helm release per session (their
start-up is paid once); a fresh application image (a new digest, labelled like a CI build) and fresh
namespaces per scenario. Everything under tests/cluster carries the ``cluster`` mark. A missing
prerequisite (root, a Debian package, a Go binary) fails every test at setup with a message naming it:
nothing is skipped.

Environment:
    PROMOTION_GATE_IMAGE_SOURCE  directory whose Dockerfile/package is built (default: this repo)
    PROMOTION_GATE_NODE_KEEP=1   leave the cluster and the release running after the session
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import kit
from tools.cluster import config, deps, images
from tools.cluster.node import ClusterError, Node

HERE = Path(__file__).resolve().parent
# The rendered manifests install into the release's namespace: they run (and are removed) first.
MODULE_ORDER = ("test_manifests.py", "test_install.py", "test_seed_story.py", "test_controllers.py", "test_faults.py")
SUMMARY = pytest.StashKey[list[str]]()
FAILED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in ours:
        if item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)

    def rank(item: pytest.Item) -> int:
        name = Path(str(item.path)).name
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    positions = [i for i, item in enumerate(items) if item in ours]
    for position, item in zip(positions, sorted(ours, key=rank), strict=True):
        items[position] = item


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and HERE in Path(str(item.path)).parents:
        cluster: ClusterUnderTest | None = item.config.stash.get(CLUSTER, None)
        if cluster is not None:
            for title, text in cluster.diagnostics():
                report.sections.append((title, text))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.write_sep("-", "single-node cluster")
        for line in lines:
            terminalreporter.write_line(line)


@dataclass
class AppImage:
    """An application image CI built once: pushed to the local registry, referenced by digest."""

    repository: str
    digest: str
    git_commit: str
    ci_run: str

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"

    def tag(self) -> str:
        return f"{self.repository}:run-{self.ci_run}"


@dataclass
class ClusterUnderTest:
    node: Node
    kube: kit.Kube
    project_image: str  # repository@digest in the local registry
    project_image_size: int
    work_dir: Path

    def diagnostics(self) -> list[tuple[str, str]]:
        sections = []
        for component in ("webhook", "operator"):
            logs = self.kube.kubectl("logs", "-n", kit.RELEASE_NAMESPACE, "-l",
                                     f"app.kubernetes.io/component={component}", "--tail=80", "--prefix",
                                     "--all-containers", check=False)
            sections.append((f"{component} Pod logs", (logs.stdout + logs.stderr)[-8000:]))
        pods = self.kube.kubectl("get", "pods", "-A", "-o", "wide", check=False)
        sections.append(("Pods", pods.stdout + pods.stderr))
        for name in ("kube-apiserver", "kubelet"):
            sections.append((f"{name} log (tail)", "\n".join(
                self.node.layout.log(name).read_text(errors="replace").splitlines()[-40:])
                if self.node.layout.log(name).exists() else ""))
        return sections


CLUSTER = pytest.StashKey[ClusterUnderTest]()


def git_commit() -> str:
    result = subprocess.run(["git", "-C", str(config.REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "0" * 40


@pytest.fixture(scope="session")
def run_id() -> str:
    """This test run's CI run id (the label ``ci.run`` of every application image it builds)."""
    return os.environ.get("CI_RUN_ID") or time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:4]


@pytest.fixture(scope="session")
def project_image_archive() -> images.BuiltImage:
    """The project image from its Dockerfile (buildah), cached by its inputs; built before the node starts."""
    try:
        deps.check_root()
        deps.ensure_packages()
        deps.find_binaries()
    except deps.MissingPrerequisite as exc:
        pytest.fail(str(exc), pytrace=False)
    source = Path(os.environ.get("PROMOTION_GATE_IMAGE_SOURCE") or config.REPO)
    existed = Path("/var/lib/containers").exists()
    try:
        return images.project_image(source, revision=git_commit())
    finally:
        if not existed:
            subprocess.run(["rm", "-rf", "/var/lib/containers"], check=False)


@pytest.fixture(scope="session")
def cluster(project_image_archive: images.BuiltImage, tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[ClusterUnderTest]:
    node = Node()
    started = time.monotonic()
    try:
        node.up()
    except (ClusterError, deps.MissingPrerequisite) as exc:
        pytest.fail(f"the single-node cluster did not start: {exc}", pytrace=False)
    up_seconds = time.monotonic() - started
    try:
        repository = f"{config.REGISTRY}/promotion-gate"
        digest = images.push(project_image_archive, f"{repository}:{project_image_archive.name.rsplit(':', 1)[1]}")
        work_dir = tmp_path_factory.mktemp("cluster")
        running = ClusterUnderTest(node, kit.Kube(node.kubeconfig, work_dir), f"{repository}@{digest}",
                                   images.image_size(project_image_archive), work_dir)
        pytestconfig.stash[CLUSTER] = running
        build = "cached" if project_image_archive.cached else f"built in {project_image_archive.seconds:.0f}s"
        pytestconfig.stash[SUMMARY] = [
            f"node up in {up_seconds:.1f}s (KUBECONFIG={node.kubeconfig})",
            f"project image {running.project_image} ({running.project_image_size / 1e6:.1f} MB compressed, {build})",
        ]
        sys.stderr.write("".join(f"[cluster] {line}\n" for line in pytestconfig.stash[SUMMARY]))
        yield running
    finally:
        if not os.environ.get("PROMOTION_GATE_NODE_KEEP"):
            node.down()


@pytest.fixture(scope="session")
def kube(cluster: ClusterUnderTest) -> kit.Kube:
    return cluster.kube


@pytest.fixture(scope="session")
def app_image(cluster: ClusterUnderTest, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], AppImage]:
    """Build and push one application image (busybox, labels git.commit and ci.run) per call."""
    directory = tmp_path_factory.mktemp("app-images")
    commit = git_commit()

    def build(purpose: str) -> AppImage:
        ci_run = f"{run_id}-{purpose}"
        repository = f"{config.REGISTRY}/acme/app"
        built = images.app_image(directory, repository=repository, git_commit=commit, ci_run=ci_run)
        digest = images.push(built, built.name)
        return AppImage(repository, digest, commit, ci_run)

    return build


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> kit.Keys:
    return kit.Keys.generate(tmp_path_factory.mktemp("keys"))


@dataclass
class Release:
    """The chart installed with its defaults plus the local image by digest and this run's policy."""

    name: str
    namespace: str
    values_file: Path
    store: kit.Store
    image: str


def release_values(image: str, keys: kit.Keys) -> dict[str, Any]:
    repository, digest = image.split("@")
    return {
        "image": {"repository": repository, "digest": digest},
        "policy": kit.policy(keys),
        # Checks every 5 s instead of 10 min, so the rotation scenario does not wait for the default.
        "operator": {"extraArgs": ["--certificate-check-interval", "5"]},
    }


def create_release_secrets(kube: kit.Kube, namespace: str, dsn: str, keys: kit.Keys) -> None:
    kube.kubectl("-n", namespace, "create", "secret", "generic", "promotion-gate-store", f"--from-literal=dsn={dsn}")
    kube.kubectl("-n", namespace, "create", "secret", "generic", "promotion-gate-operator-key",
                 f"--from-file=key.pem={keys.private('operator')}")


def restricted_namespace(kube: kit.Kube, name: str) -> None:
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/warn=restricted", "pod-security.kubernetes.io/audit=restricted")


def wait_enforced(kube: kit.Kube, namespace: str) -> None:
    """The API server calls the webhook (registration and caBundle in place): a tag Pod is refused."""

    def refused() -> bool:
        result = kube.kubectl("run", f"probe-{uuid.uuid4().hex[:5]}", "-n", namespace, "--image=busybox:1.36",
                              "--restart=Never", "--dry-run=server", check=False)
        return result.returncode != 0 and "[mutable-tag]" in result.stderr

    kit.wait_for("the webhook to refuse a tag Pod", refused, timeout=120)


@pytest.fixture(scope="session")
def release(cluster: ClusterUnderTest, keys: kit.Keys) -> Iterator[Release]:
    kube = cluster.kube
    namespace = kit.RELEASE_NAMESPACE
    restricted_namespace(kube, namespace)
    create_release_secrets(kube, namespace, cluster.node.postgres_dsn(), keys)
    values_file = cluster.work_dir / "values.yaml"
    values_file.write_text(yaml.safe_dump(release_values(cluster.project_image, keys), sort_keys=False))
    policy_file = cluster.work_dir / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(kit.policy(keys), sort_keys=False))
    kube.helm("install", kit.RELEASE, str(kit.CHART), "--namespace", namespace, "-f", str(values_file),
              "--wait", "--timeout", "5m")
    wait_enforced(kube, kube.namespace("probe", "staging"))
    host_dsn = f"postgresql://promotion_gate@127.0.0.1:{config.POSTGRES_PORT}/promotion_gate"
    yield Release(kit.RELEASE, namespace, values_file, kit.Store(host_dsn, policy_file, keys), cluster.project_image)
    if not os.environ.get("PROMOTION_GATE_NODE_KEEP"):
        kube.kubectl("delete", "validatingwebhookconfiguration", kit.RELEASE, "--ignore-not-found", check=False)
        kube.helm("uninstall", kit.RELEASE, "--namespace", namespace, "--wait", check=False)


@pytest.fixture(scope="session")
def store(release: Release) -> kit.Store:
    return release.store


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
