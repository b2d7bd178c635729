"""Shared fixtures: real server processes over real TLS, and the real database servers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.servers import PostgresServer, RunningServer, postgres_server, start_server


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
