"""Real server processes for the tests and the benchmarks: the webhook over TLS, a PostgreSQL server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override session.verify
        session.verify = str(self.ca)
        return session

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return requests.post(self.url + path, verify=str(self.ca), timeout=15, **kwargs)  # type: ignore[arg-type]

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, verify=str(self.ca), timeout=15, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def decisions(self, uid: str) -> list[dict[str, Any]]:
        """The decision log lines (JSON on stdout) of one AdmissionReview, by its request uid."""
        lines = [line for line in self.log().splitlines() if line.startswith("{") and uid in line]
        return [event for event in map(json.loads, lines) if event.get("uid") == uid]

    def kill(self) -> None:
        """SIGKILL the server and its workers at once: a crash, with no chance to clean up."""
        if self.process.poll() is None:
            if os.getpgid(self.process.pid) == self.process.pid:  # started with own_process_group
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                for pid in [self.process.pid, *self.worker_pids()]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the forked workers, or the server itself when it has none."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        return found or [self.process.pid]

    def peak_memory_kib(self) -> int:
        """The highest resident memory any worker process has used so far (VmHWM)."""
        peaks = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
        return max(peaks, default=0)

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
                 cert_dir: Path | None = None, own_process_group: bool = False) -> RunningServer:
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
                               env={**os.environ, **(env or {})}, start_new_session=own_process_group)
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


# --- PostgreSQL: a real server from Debian's package, started once per test session ------------

def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@dataclass
class PostgresServer:
    port: int
    socket_dir: Path
    bin_dir: Path
    user: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; CI runs as root, so drop to the package's user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL cluster on loopback; stop and delete it afterwards."""
    import shutil
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found; run 'make system-deps' (Debian package postgresql)")
    # Not under pytest's 0700 temp root: the postgres user must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="promotion-gate-pg-"))
    data, sockets = base / "data", base / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    try:
        subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "trust",
                                          "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        port = free_port()
        subprocess.run(_as_postgres_user([
            str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"]),
            check=True, capture_output=True)
        yield PostgresServer(port, sockets, bin_dir, user)
    finally:
        subprocess.run(_as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
