"""Serving: gunicorn (gthread workers) over TLS, with certificate hot-reload.

The serving certificate is re-read when its file changes (cert-manager, the operator or a mounted
Secret rotates it): new handshakes get the new certificate, connections in flight keep theirs, and no
request is dropped. gunicorn asks for an ``SSLContext`` for every connection it accepts; the answer is
the current context, after a ``stat`` of the files at most once per second.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

log = logging.getLogger("promotion_gate.serve")


class CertificateReloader:
    def __init__(self, certfile: Path, keyfile: Path, *, check_every: float = 1.0) -> None:
        self._certfile, self._keyfile = certfile, keyfile
        self._check_every = check_every
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._checked = time.monotonic()
        self.context = self._build()

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self._certfile).st_mtime, os.stat(self._keyfile).st_mtime)

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self._certfile), str(self._keyfile))
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
                    log.info("reloaded serving certificate %s", self._certfile)
            except (OSError, ssl.SSLError) as exc:
                # Half-written or missing files: keep serving the previous certificate.
                log.warning("keeping previous certificate, cannot load new one: %s", exc)
        return self.context


@dataclass(frozen=True)
class ServerOptions:
    bind: str
    certfile: Path
    keyfile: Path
    workers: int = 1
    threads: int = 8
    timeout: int = 30
    keepalive: int = 75
    access_log: bool = False


class GunicornServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: ServerOptions, app_factory: Callable[[], Any]) -> None:
        self._options = options
        self._factory = app_factory
        super().__init__()

    def load_config(self) -> None:
        o = self._options
        reloaders: dict[int, CertificateReloader] = {}

        def ssl_context(_conf: Any, _default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            # gunicorn asks for a context per connection: build the reloader once per worker process.
            reloader = reloaders.get(os.getpid())
            if reloader is None:
                reloader = reloaders[os.getpid()] = CertificateReloader(o.certfile, o.keyfile)
            return reloader.current()

        settings = {
            "bind": [o.bind],
            "workers": o.workers,
            "worker_class": "gthread",
            "threads": o.threads,
            "timeout": o.timeout,
            "graceful_timeout": 20,
            "keepalive": o.keepalive,
            "certfile": str(o.certfile),
            "keyfile": str(o.keyfile),
            "ssl_context": ssl_context,
            "accesslog": "-" if o.access_log else None,
            "errorlog": "-",
            "loglevel": "info",
            "limit_request_line": 8190,
            "proc_name": "promotion-gate",
            "control_socket_disable": True,  # no runtime control interface: nothing to protect
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()
