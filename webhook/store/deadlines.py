"""Deadlines for store reads made on a request's own thread.

Admission reads the store on the thread that answers the request: handing each read to another
thread only to be able to stop waiting for it cost more CPU than the read itself (two thread
wake-ups per request, docs/benchmarks.md). What bounds the wait instead is one watchdog thread: a read
still running at its deadline has its database connection interrupted — SQLite's
``sqlite3_interrupt``, or for PostgreSQL the connection's socket shut down, which also wakes a read
waiting on a lock, a stalled server or a network that went silent. The reader then fails at once
(the caller answers as for an unavailable store) and the connection is discarded, never reused.

Written by hand: no library interrupts a DB-API connection from another thread. A read that ends in
time costs two dictionary operations under a lock; the watchdog wakes every ``TICK`` seconds, so a
deadline holds to within that.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

TICK = 0.02


@dataclass
class Watch:
    """One deadline, shared by the reads a lookup makes; ``expired`` once any of them was interrupted."""

    at: float
    expired: bool = False

    def left(self) -> float:
        return self.at - time.monotonic()


@dataclass
class _Guarded:
    watch: Watch
    connection: Any
    interrupted: bool = False


Interrupt = Callable[[Any], None]


def interrupt_sqlite(connection: Any) -> None:
    connection.interrupt()


def interrupt_postgresql(connection: Any) -> None:
    """Shut the connection's socket down: a blocked read returns at once, whatever it waited for."""
    fd = connection.pgconn.socket
    duplicate = socket.socket(fileno=os.dup(fd))  # shutdown acts on the socket, not on this descriptor
    try:
        with contextlib.suppress(OSError):
            duplicate.shutdown(socket.SHUT_RDWR)
    finally:
        duplicate.close()


@dataclass
class Watchdog:
    interrupt: Interrupt
    tick: float = TICK
    _guarded: dict[int, _Guarded] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)
    _thread: threading.Thread | None = None

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[Watch]:
        """Reads on this thread inside the block are interrupted ``seconds`` from now."""
        outer = self.current()
        watch = Watch(time.monotonic() + seconds)
        self._local.watch = watch
        try:
            yield watch
        finally:
            self._local.watch = outer

    def current(self) -> Watch | None:
        watch: Watch | None = getattr(self._local, "watch", None)
        return watch

    @contextlib.contextmanager
    def guard(self, connection: Any, discard: Callable[[], None]) -> Iterator[None]:
        """Interrupt ``connection`` if the thread's deadline passes while it is in use.

        Does nothing outside :meth:`deadline`. When the watchdog interrupted the connection, ``discard``
        is called once the watchdog can no longer touch it: an interrupt that raced with the read's
        end may still have broken a connection that looks fine, and it must never be handed out again.
        """
        watch = self.current()
        if watch is None:
            yield
            return
        if watch.left() <= 0:
            watch.expired = True
            raise TimeoutError("the store's deadline passed")
        guarded = _Guarded(watch, connection)
        key = threading.get_ident()
        with self._lock:
            self._guarded[key] = guarded
            self._start()
        try:
            yield
        finally:
            with self._lock:  # after this, the watchdog can no longer touch the connection
                self._guarded.pop(key, None)
            if guarded.interrupted:
                discard()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="store-deadlines", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                for guarded in self._guarded.values():
                    if not guarded.interrupted and guarded.watch.at <= now:
                        guarded.interrupted = guarded.watch.expired = True
                        with contextlib.suppress(Exception):  # a connection already closed: nothing to stop
                            self.interrupt(guarded.connection)
