"""Fixtures for the end-to-end tests: a real API server, and Promotion Gate registered with it.

Lifetimes: one control plane and one registered webhook per session (start-up is paid once); a fresh,
uniquely named namespace per test (without controllers a deleted namespace stays Terminating forever).
When a test fails, the lines kube-apiserver and the webhook server logged while it ran are attached
to the report.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import gate as gate_mod
from tests.e2e import manifests
from tests.e2e import running_workloads as rw
from tests.e2e.cluster import (
    Cluster,
    LocalControlPlane,
    ToolchainMissing,
    cluster_kind,
    existing_cluster,
    size,
    tail,
)
from tools.servers import RunningServer, start_server

HERE = Path(__file__).resolve().parent
LOG_SOURCES = pytest.StashKey[dict[str, tuple[Path, int]]]()  # name -> (log, offset when registered)
LOG_OFFSETS = pytest.StashKey[dict[str, int]]()
SUMMARY = pytest.StashKey[list[str]]()


# --- reporting ------------------------------------------------------------------------------------


def _log_sources(config: pytest.Config) -> dict[str, tuple[Path, int]]:
    if LOG_SOURCES not in config.stash:
        config.stash[LOG_SOURCES] = {}
    return config.stash[LOG_SOURCES]


def register_logs(config: pytest.Config, logs: dict[str, Path]) -> None:
    """Attach these logs (what they say from now on) to the report of any test that fails."""
    _log_sources(config).update({name: (path, size(path)) for name, path in logs.items()})


def unregister_logs(config: pytest.Config, names: Iterable[str]) -> None:
    for name in names:
        _log_sources(config).pop(name, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the control plane, whether or not a module remembered the mark.
    for item in items:
        if HERE in Path(str(item.path)).parents and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[LOG_OFFSETS] = {name: size(path) for name, (path, _) in _log_sources(item.config).items()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and HERE in Path(str(item.path)).parents:
        offsets = item.stash.get(LOG_OFFSETS, {})
        for name, (path, registered_at) in _log_sources(item.config).items():
            # Only what was logged while this test ran (since registration, for a log added during it).
            text = tail(path, start=offsets.get(name, registered_at))
            if text:
                report.sections.append((f"{name} log ({path})", text))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.write_sep("-", "e2e control plane")
        for line in lines:
            terminalreporter.write_line(line)


# --- the cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Cluster]:
    """``local``: etcd + kube-apiserver started here; ``kind`` (PROMOTION_GATE_CLUSTER): KUBECONFIG's."""
    work_dir = tmp_path_factory.mktemp("control-plane")
    kind = cluster_kind()
    control_plane: LocalControlPlane | None = None
    if kind == "local":
        missing = ""
        try:
            control_plane = LocalControlPlane(work_dir)
        except ToolchainMissing as exc:
            missing = str(exc)
        if missing or control_plane is None:
            pytest.fail(missing, pytrace=False)
        try:
            running = control_plane.start()  # a failed start raises with the tail of each log
        except BaseException:
            control_plane.stop()
            raise
        register_logs(pytestconfig, control_plane.logs)  # start-up chatter is not any test's business
    else:
        running = existing_cluster(work_dir)
    described = running.describe()
    pytestconfig.stash[SUMMARY] = [*described, f"details: {work_dir / 'control-plane.txt'}"]
    sys.stderr.write("".join(f"[e2e] {line}\n" for line in described))
    try:
        yield running
    finally:
        if control_plane is not None:
            control_plane.stop()


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[Any]:
    client = cluster.api_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def core(api_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture(scope="session")
def apps(api_client: Any) -> Any:
    from kubernetes import client

    return client.AppsV1Api(api_client)


@pytest.fixture
def kubectl_apply(cluster: Cluster, tmp_path: Path) -> gate_mod.Apply:
    """``kubectl apply -f <file>`` of the given documents; the file path appears in kubectl's errors."""
    counter = itertools.count()

    def apply(*documents: manifests.Manifest, args: tuple[str, ...] = ()) -> gate_mod.Applied:
        return gate_mod.apply_file(cluster, tmp_path / f"manifest-{next(counter)}.yaml", *documents, args=args)

    return apply


@pytest.fixture
def namespace(core: Any, request: pytest.FixtureRequest) -> str:
    """A fresh namespace for one test, named after it."""
    return gate_mod.create_namespace(core, f"e2e-{request.node.name}")


# --- Promotion Gate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyWorkload:
    """A Deployment with a mutable tag, stored before the webhook was registered (any real cluster)."""

    namespace: str
    name: str
    image: str


@pytest.fixture
def namespaces(cluster: Cluster, core: Any) -> Iterator[rw.Namespaces]:
    """Namespaces a test makes (``rw.Namespaces``), deleted after it."""
    made = rw.Namespaces(cluster, core)
    yield made
    made.release()


@pytest.fixture(scope="session")
def legacy_deployment(cluster: Cluster, core: Any, apps: Any) -> LegacyWorkload:
    namespace = gate_mod.create_namespace(core, "e2e-legacy")
    apps.create_namespaced_deployment(namespace, manifests.deployment("payment-api", namespace,
                                                                      {"api": manifests.TAGGED}))
    return LegacyWorkload(namespace, "payment-api", manifests.TAGGED)


def start_webhook(cluster: Cluster, directory: Path, *, policy: str = gate_mod.DIGEST_ONLY_POLICY,
                  store: str | None = None, extra: Sequence[str] = ()) -> RunningServer:
    """``promotion-gate serve`` reading namespace labels through the API server (--kubernetes, KUBECONFIG)."""
    # start_server passes --no-kubernetes; click keeps the last value of a flag, so --kubernetes wins.
    server = start_server(directory, policy=policy, store=store, extra=["--kubernetes", *extra],
                          env={"KUBECONFIG": str(cluster.kubeconfig)})
    try:
        gate_mod.wait_for_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def gate(cluster: Cluster, core: Any, legacy_deployment: LegacyWorkload, pytestconfig: pytest.Config,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[gate_mod.Gate]:
    """Promotion Gate registered from the chart, and proven to be in the admission path."""
    work_dir = tmp_path_factory.mktemp("gate")
    server: RunningServer | None = None
    if cluster.kind == "local":
        server = start_webhook(cluster, work_dir / "webhook")
        registered = gate_mod.register_local(cluster, server)
    else:
        registered = gate_mod.install_in_cluster(cluster, work_dir)
    register_logs(pytestconfig, registered.logs)
    try:
        gate_mod.wait_until_enforced(cluster, core, gate_mod.create_namespace(core, "e2e-probe"))
        yield registered
    finally:
        if cluster.kind == "kind" and not os.environ.get("PROMOTION_GATE_E2E_KEEP"):
            cluster.helm("uninstall", gate_mod.RELEASE, "--namespace", gate_mod.RELEASE_NAMESPACE,
                         check=False)
        registered.unregister()
        if server is not None:
            server.stop()


@contextmanager
def solo_gate(cluster: Cluster, core: Any, config: pytest.Config, directory: Path, *, release: str,
              policy: str, session_gate: gate_mod.Gate | None, store: str | None = None,
              extra: Sequence[str] = ()) -> Iterator[gate_mod.SoloGate]:
    """A webhook server of a test's own, registered opt-in next to the session's gate (see gate.SoloGate)."""
    if cluster.kind != "local":
        pytest.skip("needs a webhook process outside the cluster (PROMOTION_GATE_CLUSTER=local)")
    server = start_webhook(cluster, directory, policy=policy, store=store, extra=extra)
    try:
        solo = gate_mod.register_solo(cluster, core, server, release=release, session_gate=session_gate)
    except BaseException:
        server.stop()
        raise
    register_logs(config, solo.registration.logs)
    try:
        yield solo
    finally:
        try:
            solo.close()
        finally:
            unregister_logs(config, solo.registration.logs)
