"""Registries for the tests: the real distribution registry on loopback, its token service, a hostile one.

``registry_server`` runs Debian's ``docker-registry`` (the CNCF distribution registry v2) with a
configuration of its own: listening on 127.0.0.1 on a free port, storage in a temporary directory,
TLS from a CA made by :mod:`webhook.certs`, and either htpasswd (basic) auth or token auth. The
package's default configuration and service are never used.

Token auth is the scheme ghcr.io and Docker Hub use: the registry answers 401 with
``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` and accepts a JWT from the realm. The realm
here is :class:`TokenService`, a small HTTPS endpoint in the test process that checks the basic
credentials and signs the token with the CA's key; the registry verifies it with the CA certificate
(``rootcertbundle``), as it would a real token service's.

``HostileRegistry`` answers like a registry that is broken or malicious (huge, malformed, lying about
digests, redirecting in circles), on plain HTTP on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tools.servers import free_port
from webhook import certs

REGISTRY_BINARY = "docker-registry"
SERVICE = "promotion-gate-tests"


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:PORT, what image references name
    ca: Path | None  # the CA of its certificate (None: plain HTTP)
    cert_dir: Path | None  # a directory holding only ca.crt, as skopeo's --dest-cert-dir wants it
    users: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    # The registry names trusted token keys the way docker/libtrust does: base32 of the first 240 bits of
    # the SHA-256 of the DER SubjectPublicKeyInfo, in groups of four.
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The realm of a token-auth registry: basic credentials in, a signed JWT for the asked scope out."""

    def __init__(self, cert_dir: Path, users: dict[str, str]) -> None:
        key = serialization.load_pem_private_key((cert_dir / "ca.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.key_id = _libtrust_key_id(key.public_key())
        self.users = users
        self.requests: list[dict[str, Any]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = service.check(self.headers.get("Authorization", ""))
                service.requests.append({"user": user, "query": query})
                if user is None:
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                self._answer(200, {"token": service.token(user, query.get("scope", [""])[0])})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def check(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    def token(self, user: str, scope: str) -> str:
        access = []
        if scope.count(":") == 2:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = _b64url(json.dumps({"typ": "JWT", "alg": "ES256", "kid": self.key_id}).encode())
        claims = _b64url(json.dumps({"iss": SERVICE, "sub": user, "aud": SERVICE, "exp": now + 600, "nbf": now - 60,
                                     "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}).encode())
        r, s = decode_dss_signature(self.key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256())))
        return f"{header}.{claims}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not listen on {port}:\n{log.read_text(errors='replace')}")


@contextmanager
def registry_server(base: Path, *, tls: bool = True, auth: str | None = "htpasswd",
                    users: dict[str, str] | None = None) -> Iterator[RunningRegistry]:
    """A distribution registry on 127.0.0.1; ``auth`` is "htpasswd", "token" or None."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise RuntimeError("docker-registry not found; run 'make system-deps' (Debian package docker-registry)")
    base.mkdir(parents=True, exist_ok=True)
    users = dict(users or {"ci-bot": "correct-horse"})
    port = free_port()
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": base64.b64encode(hashlib.sha256(
        str(base).encode()).digest()).decode(), "headers": {"X-Content-Type-Options": ["nosniff"]}}
    cert_dir: Path | None = None
    ca: Path | None = None
    token_service: TokenService | None = None
    if tls:
        ca, crt, key = certs.ensure_dev_certificates(base / "certs")
        http["tls"] = {"certificate": str(crt), "key": str(key)}
        cert_dir = base / "skopeo-certs"
        cert_dir.mkdir(exist_ok=True)
        shutil.copy(ca, cert_dir / "ca.crt")
    config: dict[str, Any] = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": False}},
                              "storage": {"filesystem": {"rootdirectory": str(base / "data")},
                                          "delete": {"enabled": True}},
                              "http": http}
    if auth == "htpasswd":
        lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}" for u, p in users.items()]
        (base / "htpasswd").write_text("\n".join(lines) + "\n")
        config["auth"] = {"htpasswd": {"realm": SERVICE, "path": str(base / "htpasswd")}}
    elif auth == "token":
        assert tls, "token auth needs TLS"
        token_service = TokenService(base / "certs", users)
        config["auth"] = {"token": {"realm": token_service.url, "service": SERVICE, "issuer": SERVICE,
                                    "rootcertbundle": str(ca)}}
    config_path = base / "config.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = base / "registry.log"
    handle = log_path.open("wb")
    process = subprocess.Popen([binary, "serve", str(config_path)], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=base)
    running = RunningRegistry(f"127.0.0.1:{port}", ca, cert_dir, users, log_path, process)
    try:
        _wait_listening(port, process, log_path)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        handle.close()
        if token_service is not None:
            token_service.stop()


# --- a hostile registry --------------------------------------------------------------------------


Answer = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class HostileRegistry:
    """Plain HTTP on 127.0.0.1: each path answers as ``routes`` says; anything else is 404."""

    routes: dict[str, Answer]
    hits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                registry.hits.append(path)
                answer = registry.routes.get(path)
                if answer is None:
                    send(self, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
                    return
                with suppress(BrokenPipeError, ConnectionResetError):
                    answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                        **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def endless(handler: BaseHTTPRequestHandler) -> None:
    """A manifest that never ends and announces no length: read until the limit, then refused."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    handler.send_header("Connection", "close")
    handler.end_headers()
    chunk = b"{" + b" " * 65535
    for _ in range(1024):  # 64 MiB at most, far past the 4 MiB a manifest may have
        handler.wfile.write(chunk)


def docker_config(directory: Path, auths: dict[str, tuple[str, str]] | None = None,
                  **settings: Any) -> Path:
    """A Docker ``config.json`` as ``docker login`` writes it (``auths`` with base64 ``auth``); returns its dir."""
    directory.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
                                          for host, (user, password) in (auths or {}).items()}, **settings}
    (directory / "config.json").write_text(json.dumps(document, indent=2))
    return directory
