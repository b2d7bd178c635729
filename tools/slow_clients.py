"""Hostile and ordinary clients for the slow-client tests: stalled connections, and a timed admission.

Everything here talks to a server on this machine's loopback range only. A "stall" is a connection
that starts a phase and never finishes it: one byte of a TLS ClientHello, part of a request head, or
part of a body, optionally trickled one byte at a time so that no single read ever times out.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tools.reviews import DIGEST, review, workload

Stall = Literal["handshake", "head", "body"]
ATTACKER_ADDRESS = "127.0.0.2"  # still loopback: the server sees a second client address
CLIENT_HELLO_FIRST_BYTE = b"\x16"  # a TLS handshake record starts with 0x16


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    ca: Path

    @classmethod
    def of(cls, url: str, ca: Path) -> Target:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        return cls(host, int(port), ca)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def open_stalled(target: Target, stall: Stall, *, source: str = "127.0.0.1",
                 timeout: float = 10.0) -> socket.socket:
    """One connection stalled in ``stall``: after this returns the server waits for the next byte."""
    raw = socket.create_connection((target.host, target.port), timeout=timeout, source_address=(source, 0))
    if stall == "handshake":
        raw.sendall(CLIENT_HELLO_FIRST_BYTE)
        return raw
    tls = target.context().wrap_socket(raw, server_hostname=target.host)
    if stall == "head":
        tls.sendall(b"POST /validate HTTP/1.1\r\nHost: gate\r\n")
    else:
        tls.sendall(b"POST /validate HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{")
    return tls


@dataclass
class Attack:
    """Stalled connections, kept open (and trickled) until the block ends."""

    connections: list[socket.socket] = field(default_factory=list)
    opened: int = 0
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def trickle(self, every: float) -> None:
        """Send one more byte on every connection each ``every`` seconds (a head or body that never ends)."""
        def run() -> None:
            while not self._stop.wait(every):
                for connection in list(self.connections):
                    with suppress(OSError, ValueError):
                        connection.send(b"x")
        threading.Thread(target=run, daemon=True).start()

    def still_open(self) -> int:
        """How many of the connections the server has not closed yet (a closed one reads EOF or errors)."""
        count = 0
        for connection in self.connections:
            connection.setblocking(False)
            try:
                data = connection.recv(1)
                count += 0 if data == b"" else 1
            except ssl.SSLWantReadError:
                count += 1
            except BlockingIOError:
                count += 1
            except OSError:
                pass
        return count

    def close(self) -> None:
        self._stop.set()
        for connection in self.connections:
            with suppress(OSError):
                connection.close()


@contextmanager
def stalled_connections(target: Target, stall: Stall, count: int, *, source: str = ATTACKER_ADDRESS,
                        trickle_every: float | None = None) -> Iterator[Attack]:
    attack = Attack()
    try:
        for _ in range(count):
            try:
                attack.connections.append(open_stalled(target, stall, source=source))
                attack.opened += 1
            except (OSError, ssl.SSLError):
                attack.refused += 1  # the server closed it to keep within its bounds
        if trickle_every is not None:
            attack.trickle(trickle_every)
        yield attack
    finally:
        attack.close()


def timed_admission(target: Target, *, source: str = "127.0.0.1",
                    timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
    """One ordinary admission on a new connection (TLS handshake included): seconds taken, and the answer."""
    import http.client

    body = json.dumps(review(workload("Pod", [f"ghcr.io/acme/api@{DIGEST}"], namespace="team-a"))).encode()
    started = time.monotonic()
    connection = http.client.HTTPSConnection(target.host, target.port, context=target.context(), timeout=timeout,
                                             source_address=(source, 0))
    try:
        connection.request("POST", "/validate", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        answer = json.loads(reply.read())
    finally:
        connection.close()
    return time.monotonic() - started, answer


def wait_closed(connection: socket.socket, limit: float) -> tuple[float, bytes]:
    """Block until the server closes ``connection`` (or ``limit`` passes): seconds waited, bytes it sent."""
    started = time.monotonic()
    connection.settimeout(limit)
    received = b""
    try:
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        return limit, received
    except OSError:
        pass
    return time.monotonic() - started, received


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
