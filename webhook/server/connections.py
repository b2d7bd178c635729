"""One client connection: TLS, HTTP/1.1 and a WSGI call, each phase under its own deadline.

Why this is written here and not taken from a WSGI server: the admission webhook must keep
answering the API server while anyone who reaches the port opens connections and stalls them.
That needs (1) no thread per connection, (2) a *total* deadline on the TLS handshake, on the
request head and on the body (a per-read timeout lets a client trickle one byte at a time for
ever), (3) the whole body read before a thread is spent on it, and (4) a bound on connections
overall and per client address. gunicorn's gthread worker blocks a thread in the handshake and the
header read; hypercorn bounds the head (its keep-alive timer) but not the body, has no connection
bounds, answers an oversized WSGI body with 400, and switches to HTTP/2 on a prior-knowledge
preface even when ALPN offered only HTTP/1.1 (all read in hypercorn 0.18's source). So: asyncio
for the waiting, h11 (the HTTP/1.1 protocol engine hypercorn itself uses) for the parsing and
framing, ``ssl.MemoryBIO`` for TLS (see :class:`webhook.server.tls.TlsStream`), and a thread
pool for the Flask app, which only ever sees complete requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import h11
import orjson

from webhook.server.tls import CertificateReloader, ConnectionClosed, TlsStream

log = logging.getLogger("promotion_gate.serve")

CLIENT_CERTIFICATE = "promotion_gate.client_certificate"  # WSGI environ key: the verified peer certificate
LINGER_SECONDS = 2.0
MAX_BODY_BYTES = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects, twice for UPDATE

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Limits:
    """What one client may cost. Seconds are totals for the phase, not per read."""

    handshake_timeout: float = 5.0
    header_timeout: float = 5.0  # from the end of the handshake (or the first byte of a kept-alive request)
    body_timeout: float = 10.0
    keepalive_timeout: float = 75.0  # an idle connection between requests
    write_timeout: float = 10.0  # the client must take the answer
    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1024
    max_connections_per_address: int = 256
    body_memory_bytes: int = 64 * 1024 * 1024  # request bodies held at once, from the first byte to the answer


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"
    BODY = "body"
    APP = "app"  # the request is complete and the app is answering it: never evicted
    WRITE = "write"  # the answer is being sent; a client that does not take it may lose it
    IDLE = "idle"

    @property
    def evictable(self) -> bool:
        return self is not Phase.APP


class CloseReason(enum.StrEnum):
    """Why the server closed a connection; the ``reason`` label of promotion_gate_connections_closed_total."""

    HANDSHAKE_TIMEOUT = "handshake-timeout"
    HEADER_TIMEOUT = "header-timeout"
    BODY_TIMEOUT = "body-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    WRITE_TIMEOUT = "write-timeout"
    TLS_ERROR = "tls-error"
    PROTOCOL_ERROR = "protocol-error"
    BODY_TOO_LARGE = "body-too-large"
    BODY_MEMORY = "body-memory"
    EVICTED = "evicted"
    REFUSED = "refused"


class ConnectionEvents(Protocol):
    def closed(self, reason: CloseReason) -> None: ...

    def open_connections(self, count: int) -> None: ...


class NoEvents:
    def closed(self, reason: CloseReason) -> None:
        pass

    def open_connections(self, count: int) -> None:
        pass


@dataclass(eq=False)
class Tracked:
    address: str
    transport: asyncio.WriteTransport
    phase: Phase = Phase.HANDSHAKE
    since: float = field(default_factory=time.monotonic)
    evicted: bool = False
    held: int = 0  # bytes of request body (or of the answer being sent) this connection holds in memory


class ConnectionTable:
    """The open connections, bounded overall and per client address, and the bodies they hold.

    When a new connection would pass a bound, the connection in that scope that has waited longest
    without being answered (handshake, head, body, an answer it does not take, or idle keep-alive) is
    closed to make room: a client that stalls loses its own oldest connection first, and a prompt
    client (the API server completes its handshake and request in milliseconds) is practically never
    the oldest. Only when every connection in the scope is being answered is the new one refused.

    Each scope is kept in the order its connections entered their current phase, so the oldest
    waiting one is found from the front, not by a scan.
    """

    def __init__(self, limits: Limits, events: ConnectionEvents) -> None:
        self._limits = limits
        self._events = events
        self._all: OrderedDict[Tracked, None] = OrderedDict()
        self._by_address: dict[str, OrderedDict[Tracked, None]] = {}
        self.held = 0

    def __len__(self) -> int:
        return len(self._all)

    def admit(self, tracked: Tracked) -> bool:
        peers = self._by_address.get(tracked.address)
        if peers is not None and len(peers) >= self._limits.max_connections_per_address \
                and not self._evict_oldest(peers, lambda t: t.phase.evictable):
            return False
        if len(self._all) >= self._limits.max_connections and not self._evict_oldest(
                self._all, lambda t: t.phase.evictable):
            return False
        self._all[tracked] = None
        self._by_address.setdefault(tracked.address, OrderedDict())[tracked] = None
        self._events.open_connections(len(self._all))
        return True

    def enter(self, tracked: Tracked, phase: Phase) -> None:
        tracked.phase = phase
        tracked.since = time.monotonic()
        if tracked in self._all:
            self._all.move_to_end(tracked)
            self._by_address[tracked.address].move_to_end(tracked)

    def hold(self, tracked: Tracked, size: int, *, force: bool = False) -> bool:
        """Account ``size`` more bytes held by ``tracked`` within the worker's body memory.

        Room is made by closing the connections still receiving a body or not taking their answer,
        oldest first; requests the app is answering keep theirs. False (nothing accounted) when even
        that leaves no room, unless ``force``: an answer already computed is sent regardless.
        """
        def droppable(t: Tracked) -> bool:
            return t.phase in (Phase.BODY, Phase.WRITE) and t.held > 0 and t is not tracked

        while self.held + size > self._limits.body_memory_bytes:
            if not self._evict_oldest(self._all, droppable):
                if not force:
                    return False
                break
        tracked.held += size
        self.held += size
        return True

    def drop_body(self, tracked: Tracked) -> None:
        self.held -= tracked.held
        tracked.held = 0

    def release(self, tracked: Tracked) -> None:
        self.drop_body(tracked)
        if tracked not in self._all:
            return
        del self._all[tracked]
        peers = self._by_address.get(tracked.address)
        if peers is not None:
            peers.pop(tracked, None)
            if not peers:
                del self._by_address[tracked.address]
        self._events.open_connections(len(self._all))

    def _evict_oldest(self, scope: OrderedDict[Tracked, None], eligible: Callable[[Tracked], bool]) -> bool:
        oldest = next((t for t in scope if eligible(t)), None)
        if oldest is None:
            return False
        oldest.evicted = True
        self.release(oldest)
        oldest.transport.abort()  # its coroutine sees the connection lost and ends
        self._events.closed(CloseReason.EVICTED)
        return True

    def idle(self) -> list[Tracked]:
        return [t for t in self._all if t.phase is Phase.IDLE]

    def busy(self) -> int:
        """Connections with a request under way (each phase has its deadline, so this drains)."""
        return sum(1 for t in self._all if t.phase is not Phase.IDLE)


# --- WSGI --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def json_answer(status: int, message: str, reason: bytes = b"") -> Answer:
    body = orjson.dumps({"error": message, "code": status})
    return Answer(status, reason, [(b"content-type", b"application/json"),
                                   (b"content-length", str(len(body)).encode())], body)


def build_environ(request: h11.Request, body: bytes, *, client: tuple[str, int], server: tuple[str, int],
                  client_certificate: dict[str, Any] | None, multiprocess: bool) -> dict[str, Any]:
    """PEP 3333's environ for a complete request (the body is already read: ``wsgi.input`` never blocks)."""
    path, _, query = request.target.partition(b"?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("ascii"),
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        CLIENT_CERTIFICATE: client_certificate,
    }
    for raw_name, raw_value in request.headers:  # h11 lower-cases the names
        # Framing is h11's business and CONTENT_LENGTH is the body we read; a name with "_" would
        # alias a "-" header in the environ (the way header smuggling starts), so it is dropped.
        if raw_name in (b"content-length", b"transfer-encoding") or b"_" in raw_name:
            continue
        name = raw_name.decode("latin-1")
        key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call_app(app: WsgiApp, environ: dict[str, Any]) -> Answer:
    """Run the WSGI app to completion (in a pool thread) and collect its whole answer."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [(status, headers)]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise RuntimeError("the WSGI app returned without calling start_response")
    status, headers = started[0]
    code, _, reason = status.partition(" ")
    return Answer(int(code), reason.encode("latin-1"),
                  [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers], b"".join(chunks))


# --- the connection ----------------------------------------------------------------------------------


class BodyMemoryFull(Exception):
    """The worker's body memory is taken by requests being answered."""


class PhaseTimeout(Exception):
    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass
class Connections:
    """Everything one worker process's connections share."""

    app: WsgiApp
    certificates: CertificateReloader
    pool: ThreadPoolExecutor
    limits: Limits = field(default_factory=Limits)
    events: ConnectionEvents = field(default_factory=NoEvents)
    multiprocess: bool = False
    stopping: bool = False
    table: ConnectionTable = field(init=False)

    def __post_init__(self) -> None:
        self.table = ConnectionTable(self.limits, self.events)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``asyncio.start_server``'s callback: one plain TCP connection, before any TLS."""
        peer = writer.get_extra_info("peername") or ("", 0)
        tracked = Tracked(str(peer[0]), writer.transport)
        if self.stopping or not self.table.admit(tracked):
            writer.transport.abort()
            self.events.closed(CloseReason.REFUSED)
            return
        stream = TlsStream(reader, writer, self.certificates.current())
        reason: CloseReason | None = None
        try:
            await _Exchange(self, stream, tracked, (str(peer[0]), int(peer[1])),
                            writer.get_extra_info("sockname") or ("", 0)).run()
        except PhaseTimeout as exc:
            reason = exc.reason
        except ssl.SSLError:
            reason = CloseReason.TLS_ERROR
        except (ConnectionClosed, ConnectionError, OSError):
            pass
        except Exception:  # a fault of the server itself: logged, and the connection closed
            log.exception("connection from %s failed", tracked.address)
        finally:
            self.table.release(tracked)
            if reason is not None and not tracked.evicted:
                self.events.closed(reason)
            stream.close()


def _protocol_error(exc: h11.RemoteProtocolError) -> str:
    # h11's words, cut short: they may quote what the client sent
    return f"malformed HTTP request: {str(exc)[:120]}"


async def _within(seconds: float, reason: CloseReason, awaitable: Any) -> Any:
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise PhaseTimeout(reason) from None


class _Exchange:
    """The requests of one connection, in order (HTTP/1.1 answers in order; pipelining is read in turn)."""

    def __init__(self, connections: Connections, stream: TlsStream, tracked: Tracked,
                 client: tuple[str, int], server: tuple[str, int]) -> None:
        self._c = connections
        self._limits = connections.limits
        self._stream = stream
        self._tracked = tracked
        self._client = client
        self._server = (str(server[0]), int(server[1]))
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=connections.limits.max_header_bytes)

    async def run(self) -> None:
        await _within(self._limits.handshake_timeout, CloseReason.HANDSHAKE_TIMEOUT, self._stream.handshake())
        certificate = self._stream.peer_certificate()
        first = True
        while True:
            request = await self._read_head(first)
            if request is None:
                return
            first = False
            body = await self._read_body(request)
            if body is None:
                return
            self._c.table.enter(self._tracked, Phase.APP)
            environ = build_environ(request, body, client=self._client, server=self._server,
                                    client_certificate=certificate, multiprocess=self._c.multiprocess)
            loop = asyncio.get_running_loop()
            try:
                answer = await loop.run_in_executor(self._c.pool, call_app, self._c.app, environ)
            except Exception:
                log.exception("the WSGI app failed on %s %r", request.method, request.target)
                answer = json_answer(500, "internal server error")
            del environ, body
            table = self._c.table
            table.drop_body(self._tracked)
            table.enter(self._tracked, Phase.WRITE)
            table.hold(self._tracked, len(answer.body), force=True)
            keep_alive = not self._c.stopping
            await self._answer(answer, keep_alive=keep_alive)
            table.drop_body(self._tracked)
            if not keep_alive or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                return
            self._h11.start_next_cycle()

    async def _next_event(self) -> Any:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await self._stream.read())
                continue
            return event

    async def _read_head(self, first: bool) -> h11.Request | None:
        if not first and not self._h11.trailing_data[0]:
            self._c.table.enter(self._tracked, Phase.IDLE)
            data = await _within(self._limits.keepalive_timeout, CloseReason.IDLE_TIMEOUT, self._stream.read())
            self._h11.receive_data(data)
        self._c.table.enter(self._tracked, Phase.HEAD)
        try:
            event = await _within(self._limits.header_timeout, CloseReason.HEADER_TIMEOUT, self._next_event())
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, _protocol_error(exc))
            raise PhaseTimeout(CloseReason.PROTOCOL_ERROR) from None
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed

    async def _read_body(self, request: h11.Request) -> bytes | None:
        self._c.table.enter(self._tracked, Phase.BODY)
        limit = self._limits.max_body_bytes
        declared = next((v for k, v in request.headers if k == b"content-length"), None)
        if declared is not None and int(declared) > limit:  # h11 checked it is digits
            await self._refuse(413, f"request body is larger than {limit} bytes")
            raise PhaseTimeout(CloseReason.BODY_TOO_LARGE)
        if self._h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()

        async def collect() -> bool:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    body.extend(event.data)
                    if len(body) > limit:
                        return False
                    if not self._c.table.hold(self._tracked, len(event.data)):
                        raise BodyMemoryFull
                elif isinstance(event, h11.EndOfMessage):
                    return True
                else:  # ConnectionClosed
                    raise ConnectionClosed("connection closed during the body")

        try:
            complete = await _within(self._limits.body_timeout, CloseReason.BODY_TIMEOUT, collect())
        except PhaseTimeout:
            await self._refuse(408, f"request body not received within {self._limits.body_timeout:g} s")
            raise
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, _protocol_error(exc))
            raise PhaseTimeout(CloseReason.PROTOCOL_ERROR) from None
        except BodyMemoryFull:
            self._c.table.drop_body(self._tracked)
            await self._refuse(503, "the server holds too many request bodies in memory; retry")
            raise PhaseTimeout(CloseReason.BODY_MEMORY) from None
        if not complete:
            await self._refuse(413, f"request body is larger than {limit} bytes")
            raise PhaseTimeout(CloseReason.BODY_TOO_LARGE)
        return bytes(body)

    async def _send(self, event: Any) -> None:
        data = self._h11.send(event)
        if data:
            await self._stream.write(data)

    async def _answer(self, answer: Answer, *, keep_alive: bool) -> None:
        headers = [(k, v) for k, v in answer.headers if k != b"connection"]
        if not keep_alive:
            headers.append((b"connection", b"close"))

        data = self._h11.send(h11.Response(status_code=answer.status, headers=headers, reason=answer.reason)) or b""
        if answer.body:
            data += self._h11.send(h11.Data(data=answer.body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        await _within(self._limits.write_timeout, CloseReason.WRITE_TIMEOUT, self._stream.write(data))

    async def _refuse(self, status: int, message: str) -> None:
        """A JSON error, then the connection closes (the rest of the request is never read)."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(h11.LocalProtocolError, PhaseTimeout, TimeoutError, ConnectionClosed, OSError,
                                 ssl.SSLError):
            await self._answer(json_answer(status, message), keep_alive=False)
            # Lingering close: closing with unread bytes makes the kernel send a reset, which can
            # destroy the answer before the client reads it. Read and drop for a moment first.
            async with asyncio.timeout(LINGER_SECONDS):
                while await self._stream.read():
                    pass
