"""Serving: an asyncio loop per worker process, TLS with certificate hot-reload, a WSGI thread pool.

Each worker process accepts connections on the shared listening socket and waits on all of them in
one event loop; a connection holds a thread only while the Flask app answers its complete request
(:mod:`webhook.server.connections`). ``--workers`` is the number of such processes, ``--threads``
the size of each one's thread pool. There is no runtime control interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType

from webhook.server.connections import ConnectionEvents, Connections, Limits, NoEvents, WsgiApp
from webhook.server.tls import CertificateReloader, TlsFiles

log = logging.getLogger("promotion_gate.serve")
GRACEFUL_SECONDS = 20.0  # in-flight requests get this long after SIGTERM
RESPAWN_PAUSE = 1.0
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


@dataclass(frozen=True)
class ServerOptions:
    bind: str
    tls: TlsFiles
    workers: int = 1
    threads: int = 8
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Served:
    """What one worker process serves: the WSGI app and where its connection events are counted."""

    app: WsgiApp
    events: ConnectionEvents = field(default_factory=NoEvents)


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--bind {bind!r}: expected HOST:PORT, e.g. 0.0.0.0:8443 or [::]:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen(bind: str) -> socket.socket:
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, so the connection bounds decide."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


async def _serve_worker(sock: socket.socket, options: ServerOptions, served: Served) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pool = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="wsgi")
    connections = Connections(app=served.app, certificates=CertificateReloader(options.tls), pool=pool,
                              limits=options.limits, events=served.events, multiprocess=options.workers > 1)
    # The stream reader's own buffer limit; TLS records arrive in 16 KiB reads anyway.
    # asyncio listens again with its own backlog (100 by default): keep the kernel's queue long, so a
    # burst of new connections waits to be accepted rather than for a SYN retransmission.
    server = await asyncio.start_server(connections.handle, sock=sock, limit=64 * 1024, backlog=LISTEN_BACKLOG)
    try:
        await stop.wait()
    finally:
        connections.stopping = True
        server.close()
        for idle in connections.table.idle():  # requests under way are answered (Connection: close)
            idle.transport.abort()
        deadline = time.monotonic() + GRACEFUL_SECONDS
        while connections.table.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pool.shutdown(wait=False, cancel_futures=True)


def _run_worker(sock: socket.socket, options: ServerOptions, factory: Callable[[], Served]) -> None:
    served = factory()  # after the fork: each worker builds its own app, store engine and caches
    asyncio.run(_serve_worker(sock, options, served))


def serve(options: ServerOptions, factory: Callable[[], Served],
          worker_exited: Callable[[int], None] = lambda _pid: None) -> None:
    """Serve until SIGTERM or SIGINT; with several workers, a parent process keeps them running.

    ``worker_exited(pid)`` is called in the parent for each worker that ended, before any replacement starts.
    """
    raise_open_file_limit()
    sock = listen(options.bind)
    if options.workers == 1:
        _run_worker(sock, options, factory)
        return
    _Supervisor(sock, options, factory, worker_exited).run()


class _Supervisor:
    """Forks the workers, restarts one that dies, and passes SIGTERM/SIGINT on to all of them."""

    def __init__(self, sock: socket.socket, options: ServerOptions, factory: Callable[[], Served],
                 worker_exited: Callable[[int], None]) -> None:
        self._sock = sock
        self._options = options
        self._factory = factory
        self._worker_exited = worker_exited
        self._children: set[int] = set()
        self._stopping = False

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                _run_worker(self._sock, self._options, self._factory)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children.add(pid)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self._options.workers):
            self._spawn()
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            self._children.discard(pid)
            with contextlib.suppress(Exception):  # bookkeeping only: never stops the supervisor
                self._worker_exited(pid)
            if not self._stopping:
                log.error("worker %d exited (%s); starting a new one", pid, os.waitstatus_to_exitcode(status))
                time.sleep(RESPAWN_PAUSE)
                if not self._stopping:  # a SIGTERM during the pause: no new worker that nobody would stop
                    self._spawn()
