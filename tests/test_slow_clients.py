"""Clients that stall: in the TLS handshake, in the request head, in the body. Against a real server process.

Each phase has a total deadline (not per read), a stalled connection never holds a thread, and the
connection bounds close a stalling client's own oldest connection first. So ordinary admissions are
answered within a second while a thousand stalled connections from one address are open.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DIGEST_ONLY_POLICY
from tools.reviews import review, workload
from tools.servers import RunningServer, start_server
from tools.slow_clients import (
    ATTACKER_ADDRESS,
    Stall,
    Target,
    open_stalled,
    rss_bytes,
    stalled_connections,
    timed_admission,
    wait_closed,
)

ANSWER_BOUND = 1.0  # seconds: what the issue asks of an ordinary admission under attack
STALLED = 1000
ORDINARY_REQUESTS = 10


def target(server: RunningServer) -> Target:
    return Target.of(server.url, server.ca)


def metric(server: RunningServer, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", server.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The server with its default limits."""
    server = start_server(tmp_path_factory.mktemp("guarded"), policy=DIGEST_ONLY_POLICY)
    yield server
    server.stop()


def assert_ordinary_admissions_answered(server: RunningServer, source: str) -> list[float]:
    times = []
    for _ in range(ORDINARY_REQUESTS):
        seconds, answer = timed_admission(target(server), source=source)
        assert answer["response"]["allowed"] is True
        times.append(seconds)
    assert max(times) < ANSWER_BOUND, f"ordinary admissions took {times}"
    return times


# trickle: one more byte every half second, so no single read ever waits long
ATTACKS: dict[str, tuple[Stall, float | None]] = {
    "handshake stalled after one byte": ("handshake", None),
    "head trickled": ("head", 0.5),
    "body trickled": ("body", 0.5),
}


@pytest.mark.parametrize(("stall", "trickle"), ATTACKS.values(), ids=ATTACKS.keys())
@pytest.mark.parametrize("client", ["another address", "the attacker's address"])
def test_a_thousand_stalled_connections_leave_admissions_answered(guarded: RunningServer, stall: Stall,
                                                                  trickle: float | None, client: str) -> None:
    source = ATTACKER_ADDRESS if client == "the attacker's address" else "127.0.0.1"
    with stalled_connections(target(guarded), stall, STALLED, trickle_every=trickle) as attack:
        assert attack.opened + attack.refused == STALLED
        held = metric(guarded, "promotion_gate_connections_open")
        assert held >= 200, "the server should hold the attacker's connections up to the per-address bound"
        times = assert_ordinary_admissions_answered(guarded, source)
        print(f"\n[slow-clients] {stall}: {attack.opened} opened, {held:.0f} held, "
              f"ordinary admissions max {max(times) * 1000:.0f} ms")
    assert guarded.get("/healthz").status_code == 200


def test_all_thousand_stalled_connections_are_held_when_the_bounds_allow(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # The bounds out of the way: one event loop waits on all of them at once, and still answers.
    server = start_server(tmp_path_factory.mktemp("roomy"), policy=DIGEST_ONLY_POLICY,
                          extra=["--max-connections", "4000", "--max-connections-per-address", "4000",
                                 "--handshake-timeout", "60"])
    try:
        before = rss_bytes(server.process.pid)
        with stalled_connections(target(server), "handshake", STALLED) as attack:
            assert attack.opened == STALLED
            assert metric(server, "promotion_gate_connections_open") >= STALLED
            times = assert_ordinary_admissions_answered(server, "127.0.0.1")
            grown = rss_bytes(server.process.pid) - before
            assert attack.still_open() == STALLED
            print(f"\n[slow-clients] {STALLED} stalled connections held, memory grew {grown / 2**20:.0f} MiB, "
                  f"ordinary admissions max {max(times) * 1000:.0f} ms")
            assert grown < 200 * 2**20  # about 50 KB a connection; asyncio's own TLS transport costs 300 KB
    finally:
        server.stop()


# --- every phase has a total deadline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hasty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("hasty"), policy=DIGEST_ONLY_POLICY,
                          extra=["--handshake-timeout", "1", "--header-timeout", "1", "--body-timeout", "1",
                                 "--keepalive-timeout", "1"])
    yield server
    server.stop()


TRICKLE = 0.2  # well inside the 1 s deadline: a per-read timeout would never fire


def trickled(connection: socket.socket) -> Callable[[], None]:
    import threading

    stop = threading.Event()

    def run() -> None:
        while not stop.wait(TRICKLE):
            try:
                connection.send(b"x")
            except (OSError, ValueError):
                return

    threading.Thread(target=run, daemon=True).start()
    return stop.set


@pytest.mark.parametrize("stall", ["handshake", "head", "body"])
def test_a_stalled_connection_is_closed_after_its_deadline(hasty: RunningServer, stall: Stall) -> None:
    connection = open_stalled(target(hasty), stall)
    stop = trickled(connection) if stall != "handshake" else (lambda: None)
    try:
        waited, received = wait_closed(connection, 10.0)
    finally:
        stop()
        connection.close()
    assert 0.9 <= waited < 5.0, f"closed after {waited:.2f}s; the deadline is 1 s"
    if stall == "body":  # a request was under way: it gets an answer before the connection closes
        status_line, _, rest = received.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 "
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1]) == {
            "error": "request body not received within 1 s", "code": 408}
    reason = {"handshake": "handshake-timeout", "head": "header-timeout", "body": "body-timeout"}[stall]
    assert metric(hasty, f'promotion_gate_connections_closed_total{{reason="{reason}"}}') >= 1


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(hasty: RunningServer) -> None:
    t = target(hasty)
    connection = http.client.HTTPSConnection(t.host, t.port, context=t.context(), timeout=10)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read() == b'{"status":"ok"}\n'
    assert connection.sock is not None
    waited, _ = wait_closed(connection.sock, 10.0)
    connection.close()
    assert 0.9 <= waited < 5.0


# --- connection bounds ----------------------------------------------------------------------------


BOUNDS = {
    "per address, client at the attacker's address": (["--max-connections-per-address", "4"], ATTACKER_ADDRESS),
    "overall, client at another address": (["--max-connections", "4"], "127.0.0.1"),
}


@pytest.mark.parametrize(("bound", "source"), BOUNDS.values(), ids=BOUNDS.keys())
def test_the_oldest_stalled_connection_makes_room(tmp_path_factory: pytest.TempPathFactory, bound: list[str],
                                                  source: str) -> None:
    server = start_server(tmp_path_factory.mktemp("tight"), policy=DIGEST_ONLY_POLICY,
                          extra=[*bound, "--handshake-timeout", "60"])
    try:
        with stalled_connections(target(server), "handshake", 4) as attack:
            _, answer = timed_admission(target(server), source=source)
            assert answer["response"]["allowed"] is True
            assert attack.still_open() == 3  # the first one was closed to make room
        assert metric(server, 'promotion_gate_connections_closed_total{reason="evicted"}') == 1
    finally:
        server.stop()


def test_bodies_in_memory_are_bounded_and_the_oldest_unfinished_one_makes_room(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # 16 MiB of body memory; three clients each send 7 MiB of an 8 MiB body and stall.
    server = start_server(tmp_path_factory.mktemp("bodies"), policy=DIGEST_ONLY_POLICY,
                          extra=["--body-memory", "16", "--body-timeout", "60"])
    t = target(server)
    stalled = []
    try:
        for _ in range(3):
            raw = socket.create_connection((t.host, t.port), timeout=30, source_address=(ATTACKER_ADDRESS, 0))
            tls = t.context().wrap_socket(raw, server_hostname=t.host)
            tls.sendall(b"POST /validate HTTP/1.1\r\nHost: gate\r\nContent-Length: 8388608\r\n\r\n")
            tls.sendall(b" " * (7 * 2**20))
            stalled.append(tls)
        _, answer = timed_admission(t)
        assert answer["response"]["allowed"] is True
        assert metric(server, 'promotion_gate_connections_closed_total{reason="evicted"}') == 1
        first_closed, _ = wait_closed(stalled[0], 5.0)
        assert first_closed < 5.0, "the oldest unfinished body should have been dropped"
    finally:
        for connection in stalled:
            connection.close()
        server.stop()


# --- bodies over the limit --------------------------------------------------------------------------


def raw_request(server: RunningServer, head: bytes, body: Iterator[bytes]) -> tuple[bytes, bytes]:
    t = target(server)
    with t.context().wrap_socket(socket.create_connection((t.host, t.port), timeout=30),
                                 server_hostname=t.host) as tls:
        tls.sendall(head)
        try:
            for chunk in body:
                tls.sendall(chunk)
        except (ssl.SSLError, OSError):
            pass  # the server answered and closed before the whole body was sent
        _, received = wait_closed(tls, 30.0)
    status_line, _, rest = received.partition(b"\r\n")
    return status_line, rest.split(b"\r\n\r\n", 1)[1]


def test_chunked_body_over_8_mib_is_413(guarded: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        piece = b" " * 65536
        for _ in range(9 * 16):  # 9 MiB
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    status, body = raw_request(guarded, b"POST /validate HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n", chunks())
    assert status == b"HTTP/1.1 413 "
    assert json.loads(body) == {"error": "request body is larger than 8388608 bytes", "code": 413}


def test_expect_continue_over_the_limit_is_refused_before_the_body(guarded: RunningServer) -> None:
    status, body = raw_request(guarded, b"POST /validate HTTP/1.1\r\nHost: gate\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 9437184\r\n\r\n", iter(()))
    assert status == b"HTTP/1.1 413 "
    assert json.loads(body) == {"error": "request body is larger than 8388608 bytes", "code": 413}


MALFORMED_HTTP = {
    "no Host header": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "malformed HTTP request: Missing mandatory Host: header"),
    "bad chunk size": (b"POST /validate HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
                       "malformed HTTP request: illegal chunk header: bytearray(b'zz\\r\\n')"),
    "two different Content-Lengths": (b"POST /validate HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\n"
                                      b"Content-Length: 2\r\n\r\n", 400,
                                      "malformed HTTP request: conflicting Content-Length headers"),
    "header block of 100 kB": (b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431,
                                 "malformed HTTP request: Receive buffer too long"),
}


@pytest.mark.parametrize(("request_bytes", "status", "message"), MALFORMED_HTTP.values(), ids=MALFORMED_HTTP.keys())
def test_malformed_http_gets_a_json_error(guarded: RunningServer, request_bytes: bytes, status: int,
                                          message: str) -> None:
    status_line, body = raw_request(guarded, request_bytes, iter(()))
    assert status_line.startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(body) == {"error": message, "code": status}


def test_answers_a_client_does_not_take_count_against_body_memory(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Three clients post reviews whose denials are about 10 MB each and never read them: the answers
    # stay in the server's memory only until newer ones need the room.
    server = start_server(tmp_path_factory.mktemp("readers"), policy=DIGEST_ONLY_POLICY,
                          extra=["--body-memory", "16", "--body-timeout", "60"])
    t = target(server)
    body = json.dumps(review(workload("Pod", [f"r.example/team/app-{i}:{i}" for i in range(50_000)],
                                      namespace="team-a"))).encode()
    silent = []
    try:
        for _ in range(3):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that takes almost nothing
            raw.bind((ATTACKER_ADDRESS, 0))
            raw.settimeout(60)
            raw.connect((t.host, t.port))
            tls = t.context().wrap_socket(raw, server_hostname=t.host)
            tls.sendall(b"POST /validate HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            silent.append(tls)
        deadline = time.monotonic() + 60
        while metric(server, 'promotion_gate_connections_closed_total{reason="evicted"}') < 2:
            assert time.monotonic() < deadline, "the oldest unread answers should have been dropped"
            time.sleep(0.2)
        _, answer = timed_admission(t)
        assert answer["response"]["allowed"] is True
        # The last one was never dropped for room: the write deadline (10 s) closes it.
        while metric(server, 'promotion_gate_connections_closed_total{reason="write-timeout"}') < 1:
            assert time.monotonic() < deadline, "an answer not taken within 10 s should be abandoned"
            time.sleep(0.5)
    finally:
        for connection in silent:
            connection.close()
        server.stop()


def test_several_workers_serve_and_a_dead_one_is_replaced(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tmp_path_factory.mktemp("workers"), policy=DIGEST_ONLY_POLICY, extra=["--workers", "2"])
    try:
        def workers() -> set[int]:  # living children (a killed one stays a zombie until it is reaped)
            children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
            living = set()
            for pid in children:
                with contextlib.suppress(FileNotFoundError):
                    if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                        living.add(int(pid))
            return living

        first = workers()
        assert len(first) == 2
        for _ in range(10):
            assert timed_admission(target(server))[1]["response"]["allowed"] is True
        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(workers() - {killed}) < 2:
            assert time.monotonic() < deadline, "a dead worker should be replaced"
            time.sleep(0.2)
        for _ in range(10):
            assert timed_admission(target(server))[1]["response"]["allowed"] is True
        assert "exited (-9); starting a new one" in server.log()
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_a_request_under_way_is_answered_after_sigterm(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tmp_path_factory.mktemp("graceful"), policy=DIGEST_ONLY_POLICY)
    t = target(server)
    body = json.dumps(review(workload("Pod", ["api:1.4"], namespace="team-a"))).encode()
    with t.context().wrap_socket(socket.create_connection((t.host, t.port), timeout=30),
                                 server_hostname=t.host) as tls:
        tls.sendall(b"POST /validate HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        tls.sendall(body[10:])
        _, received = wait_closed(tls, 15.0)
    head, _, answer = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert json.loads(answer)["response"]["allowed"] is False
    assert server.process.wait(timeout=15) == 0
