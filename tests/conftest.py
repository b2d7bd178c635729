"""Shared fixtures: real server processes over real TLS, and the real database servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from webhook import certs

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "webhook.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    ca: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    cert_dir: Path

    def session(self) -> requests.Session:
        session = requests.Session()
        session.verify = str(self.ca)
        return session

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return requests.post(self.url + path, verify=str(self.ca), timeout=15, **kwargs)  # type: ignore[arg-type]

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, verify=str(self.ca), timeout=15, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(tmp: Path, *, policy: str | None = None, store: str | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 cert_dir: Path | None = None) -> RunningServer:
    tmp.mkdir(parents=True, exist_ok=True)
    cert_dir = cert_dir or tmp / "certs"
    certs.ensure_dev_certificates(cert_dir)
    port = free_port()
    args = [*CLI, "serve", "--bind", f"127.0.0.1:{port}", "--cert-dir", str(cert_dir), "--no-kubernetes"]
    if policy is not None:
        policy_path = tmp / "policy.yaml"
        policy_path.write_text(policy)
        args += ["--policy", str(policy_path)]
    if store:
        args += ["--store", store]
    args += extra or []
    log_path = tmp / f"server-{port}.log"
    handle = log_path.open("wb")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, **(env or {})})
    server = RunningServer(f"https://127.0.0.1:{port}", cert_dir / "ca.crt", process, log_path, cert_dir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if server.get("/healthz").status_code == 200:
                return server
        except requests.RequestException:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


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
