"""Shared fixtures: real server processes over real TLS, and the real database servers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.servers import PostgresServer, RunningServer, postgres_server, start_server
from webhook.store import SqlStore, open_store


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def factory(**kwargs: object) -> RunningServer:
        server = start_server(tmp_path / f"srv{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


DIGEST_ONLY_POLICY = """\
apiVersion: promotion-gate.io/v1
kind: Policy
namespaces:
  unmapped: digest-only
"""


@pytest.fixture(scope="module")
def digest_only_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("digest-only"), policy=DIGEST_ONLY_POLICY,
                          extra=["--baseline-endpoint"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        with postgres_server() as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each backend: one test suite, both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    name = "t_" + uuid.uuid4().hex[:16]
    return server.create_database(name)


@pytest.fixture
def store(store_url: str) -> SqlStore:
    """A migrated, empty store on each backend."""
    s = open_store(store_url)
    s.migrate()
    return s


# --- registries: the real distribution registry on loopback, with images the tests made ---------

from tools.oci_images import Layout, push  # noqa: E402
from tools.registries import RunningRegistry, registry_server  # noqa: E402

COMMIT = "3f9c2a1e7b0d4c5a8e6f1b2d3c4a5e6f7a8b9c0d"
LABELS = {"org.opencontainers.image.revision": COMMIT, "git.commit": COMMIT, "ci.run": "8812345",
          "org.opencontainers.image.source": "https://github.com/acme/payment-api"}


@dataclass
class Images:
    """What the session's registry holds: tag -> digest, and the layout they were pushed from."""

    registry: RunningRegistry
    layout: Layout
    digests: dict[str, str]

    def ref(self, tag: str, repository: str = "acme/payment-api") -> str:
        return f"{self.registry.host}/{repository}:{tag}"

    def push(self, tag: str, descriptor: dict[str, object], repository: str = "acme/payment-api") -> str:
        self.layout.tag(tag, descriptor)
        user, password = next(iter(self.registry.users.items()))
        self.digests[tag] = push(self.layout, tag, self.ref(tag, repository), cert_dir=self.registry.cert_dir,
                                 credentials=(user, password))
        return self.digests[tag]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """A TLS, htpasswd registry with the images the tests read (pushed once per session with skopeo)."""
    base = tmp_path_factory.mktemp("registry")
    try:
        with registry_server(base / "registry", auth="htpasswd") as registry:
            layout = Layout(base / "layout")
            made = Images(registry, layout, {})
            made.push("abc123", layout.index([layout.image(LABELS, architecture="amd64"),
                                              layout.image(LABELS, architecture="arm64")]))
            made.push("single", layout.image(LABELS, content="single"))
            made.push("unlabelled", layout.image({"maintainer": "payments"}, content="unlabelled"))
            made.push("split", layout.index([
                layout.image({**LABELS, "git.commit": "1111111", "org.opencontainers.image.revision": "1111111"},
                             architecture="amd64", content="split"),
                layout.image(LABELS, architecture="arm64", content="split")]))
            made.push("half", layout.index([layout.image(LABELS, architecture="amd64", content="half"),
                                            layout.image({}, architecture="arm64", content="half")]))
            yield made
    except RuntimeError as exc:
        pytest.fail(str(exc))
