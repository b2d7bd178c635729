"""TLS for the serving loop: the certificate that hot-reloads, and TLS over an asyncio stream.

The serving certificate is re-read when its files change (cert-manager, the operator or a mounted
Secret rotates it): new handshakes get the new certificate, connections in flight keep theirs, and
no request is dropped. The files are looked at (``stat``) at most once a second.

Optionally the server asks clients for a certificate (``CERT_OPTIONAL``): a client that presents one
must present one the configured client CA signed, or the handshake fails; a client that presents
none still connects, and each route decides whether it needs one (``/validate`` does when a client
CA is configured, the record API never does: CI clients authenticate with bearer tokens).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("promotion_gate.serve")

READ_CHUNK = 16 * 1024  # one TLS record at most


@dataclass(frozen=True)
class TlsFiles:
    certfile: Path
    keyfile: Path
    client_ca: Path | None = None  # PEM bundle; clients that present a certificate must chain to it


class CertificateReloader:
    """The current ``SSLContext``; a new one is built when the certificate, key or client CA changes."""

    def __init__(self, files: TlsFiles, *, check_every: float = 1.0) -> None:
        self._files = files
        self._check_every = check_every
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._checked = time.monotonic()
        self.context = self._build()

    def _paths(self) -> Sequence[Path]:
        f = self._files
        return (f.certfile, f.keyfile) if f.client_ca is None else (f.certfile, f.keyfile, f.client_ca)

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(path).st_mtime for path in self._paths())

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
        context.set_alpn_protocols(["http/1.1"])  # HTTP/1.1 only: one protocol, one set of deadlines
        context.load_cert_chain(str(self._files.certfile), str(self._files.keyfile))
        if self._files.client_ca is not None:
            context.load_verify_locations(cafile=str(self._files.client_ca))
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < self._check_every:
            return self.context
        with self._lock:
            self._checked = now
            try:
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self.context = self._build()
                    self._stamp = stamp
                    log.info("reloaded serving certificate %s", self._files.certfile)
            except (OSError, ssl.SSLError) as exc:
                # Half-written or missing files: keep serving the previous certificate.
                log.warning("keeping previous certificate, cannot load new one: %s", exc)
        return self.context


class ConnectionClosed(Exception):
    """The peer went away (EOF, reset, or a TLS alert)."""


class TlsStream:
    """TLS over a plain asyncio stream, through ``ssl.MemoryBIO`` (the stdlib's sans-I/O TLS).

    Hand-written on purpose, instead of ``StreamWriter.start_tls``: asyncio's TLS transport allocates
    a 256 KiB read buffer per connection up front (about 300 KB per stalled connection, measured),
    so a thousand connections that only open and wait would cost 300 MB. Through the BIO pair a
    waiting connection costs about 50 KB, and every wait is an ``await`` that the caller's
    deadline (``asyncio.timeout``) can cut.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> None:
        data = await self._reader.read(READ_CHUNK)
        if not data:
            raise ConnectionClosed("connection closed by the client")
        self._incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def read(self) -> bytes:
        """Some decrypted bytes; ``b""`` when the client closed the connection."""
        while True:
            try:
                return self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                try:
                    await self._fill()
                except ConnectionClosed:
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    def peer_certificate(self) -> dict[str, Any] | None:
        """The client certificate, only when one was presented and verified against the client CA."""
        cert = self._tls.getpeercert()
        return cert or None

    def close(self) -> None:
        try:
            self._tls.unwrap()  # queue a close_notify; sent if the socket still takes it
            self._writer.write(self._outgoing.read())
        except (ssl.SSLError, OSError, RuntimeError, ValueError):
            pass
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()
