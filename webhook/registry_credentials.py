"""Registry credentials where registry users already keep them: Docker's ``config.json``.

The file is ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``: what ``docker login``,
``skopeo login --authfile`` and docker/login-action write. For one registry host the lookup follows
the docker CLI's order:

1. ``credHelpers[host]``: the helper program ``docker-credential-<name> get`` (the credential helper
   protocol: the server URL on stdin, ``{"Username", "Secret"}`` on stdout);
2. ``credsStore``: the same protocol with the default helper;
3. ``auths[host]``: ``auth`` (base64 ``user:password``) or ``username`` and ``password``.

Identity tokens (OAuth refresh tokens that ``docker login`` keeps for some registries) are reported as
unsupported rather than silently ignored. Nothing here is cached between commands.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webhook.core.errors import InvalidInput

MAX_CONFIG_BYTES = 1024 * 1024
MAX_HELPER_OUTPUT = 64 * 1024
HELPER_TIMEOUT_SECONDS = 30
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = ("index.docker.io", "docker.io", "registry-1.docker.io")


class CredentialsError(InvalidInput):
    """The Docker config or a credential helper cannot be used; the message names the file or helper."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""
    origin: str = ""  # where they came from, for messages ("~/.docker/config.json", "docker-credential-pass")
    identity_token: bool = False


def config_path(directory: Path | None = None, environ: dict[str, str] | None = None) -> Path:
    """``<directory>/config.json``, ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    env = os.environ if environ is None else environ
    if directory is None:
        directory = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    return directory / "config.json"


def _host_of(key: str) -> str:
    """A config key (``https://ghcr.io``, ``ghcr.io``, ``https://index.docker.io/v1/``) as ``host[:port]``."""
    text = key.strip().lower()
    for scheme in ("https://", "http://"):
        text = text.removeprefix(scheme)
    return text.split("/", 1)[0]


def _candidates(registry: str) -> tuple[str, ...]:
    host = registry.lower()
    return _DOCKER_HUB_HOSTS if host in _DOCKER_HUB_HOSTS else (host,)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise CredentialsError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document = json.loads(data or b"{}")
    except (ValueError, RecursionError) as exc:
        raise CredentialsError(f"{path}: not valid JSON") from exc
    if not isinstance(document, dict):
        raise CredentialsError(f"{path}: must hold a JSON object")
    return document


def _from_auths(path: Path, auths: Any, hosts: tuple[str, ...]) -> Credentials | None:
    if not isinstance(auths, dict):
        raise CredentialsError(f"{path}: auths must be an object")
    for key, entry in auths.items():
        if _host_of(str(key)) not in hosts:
            continue
        where = f"{path}: auths.{key}"
        if not isinstance(entry, dict):
            raise CredentialsError(f"{where} must be an object")
        if entry.get("identitytoken"):
            return Credentials("", origin=str(path), identity_token=True)
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise CredentialsError(f"{where}.auth is not base64 of user:password") from exc
            username, colon, password = decoded.partition(":")
            if not colon:
                raise CredentialsError(f"{where}.auth is not base64 of user:password")
            return Credentials(username, password, str(path))
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")), str(path))
    return None


def _from_helper(path: Path, helper: Any, server: str, setting: str) -> Credentials | None:
    if not isinstance(helper, str) or not helper or "/" in helper:
        raise CredentialsError(f"{path}: {setting} must name a credential helper, such as \"pass\"")
    program = f"docker-credential-{helper}"
    found = shutil.which(program)
    if found is None:
        raise CredentialsError(f"{path}: {setting} names the credential helper {program}, which is not installed "
                               "(not on PATH)")
    try:
        result = subprocess.run([found, "get"], input=server.encode(), capture_output=True,
                                timeout=HELPER_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CredentialsError(f"{program} get did not answer within {HELPER_TIMEOUT_SECONDS}s") from exc
    output = result.stdout[:MAX_HELPER_OUTPUT]
    if result.returncode != 0:
        if b"credentials not found" in output.lower() or b"credentials not found" in result.stderr.lower():
            return None
        problem = (output or result.stderr[:500]).decode(errors="replace").strip()
        raise CredentialsError(f"{program} get failed (exit {result.returncode}): {problem}")
    try:
        answer = json.loads(output)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsError(f"{program} get did not answer with {{\"Username\", \"Secret\"}} JSON") from exc
    if username == "<token>":
        return Credentials("", origin=program, identity_token=True)
    return Credentials(username, secret, program)


def lookup(registry: str, path: Path) -> Credentials | None:
    """The credentials ``path`` holds for ``registry`` (``host[:port]``), or None for anonymous access."""
    config = _read_config(path)
    hosts = _candidates(registry)
    server = DOCKER_HUB_SERVER if hosts == _DOCKER_HUB_HOSTS else registry
    helpers = config.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise CredentialsError(f"{path}: credHelpers must be an object")
    for key, helper in helpers.items():
        if _host_of(str(key)) in hosts:
            return _from_helper(path, helper, server, f"credHelpers.{key}")
    if config.get("credsStore"):
        found = _from_helper(path, config["credsStore"], server, "credsStore")
        if found is not None:
            return found
    return _from_auths(path, config.get("auths") or {}, hosts)
