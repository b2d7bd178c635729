"""Reading an image from its registry over the OCI distribution API, for ``promotion-gate record``.

Only the CI side reads a registry. Admission never does: it judges a digest by the signed records in
the store alone, so a registry outage, a slow registry or a registry that lies can never block (or
admit) a deploy. What ``record`` learns here is signed into the record by the pipeline's key.

**Why by hand.** The client is a few hundred lines on ``requests`` (already a dependency), written
after evaluating the maintained Python OCI clients against what this command must guarantee:

* oras-py (``oras`` 0.2.43): ``get_manifest`` returns parsed JSON, not the bytes, so the digest cannot
  be computed from what was received; requests are sent without a timeout, and its retry decorator
  sleeps 2 + 3^n seconds on connection errors (about two minutes before "registry down" is reported);
  the auth backend (token or basic) is chosen up front instead of from the registry's challenge; it
  reads ``~/.docker/config.json`` but not ``$DOCKER_CONFIG``.
* python-dxf 12.1.1: the closest fit (bearer and basic challenges, timeouts, a CA bundle, raw
  manifests), but it reads every body whole with no size bound (manifest, token response), checks a
  manifest only against the registry's own ``Docker-Content-Digest`` header, has no Docker config
  support, and brings tqdm and an unmaintained WWW-Authenticate parser along.

Neither bounds what a hostile registry may send, and both would need their private request paths
to add it. What is done here: every body is read with a size limit, the whole read has a deadline,
every manifest and config is hashed and compared with the digest it was asked for (or, for a tag,
the digest *is* the hash of the bytes received), redirects are limited, credentials come from
Docker's config (:mod:`webhook.registry_credentials`) only when the registry asks for them, and
``--insecure-registry`` is refused for anything but a registry on this machine.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from webhook import registry_credentials
from webhook.core import image_manifests as oci
from webhook.core.errors import InvalidInput
from webhook.core.image_labels import PlatformLabels
from webhook.core.references import ImageReference
from webhook.registry_credentials import Credentials

MAX_TOKEN_BYTES = 64 * 1024
MAX_ERROR_BYTES = 16 * 1024
MAX_REDIRECTS = 5
USER_AGENT = "promotion-gate"
_DOCKER_HUB_API = "registry-1.docker.io"
_PARAM = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


class RegistryError(Exception):
    """The registry could not give us the image; the message says what happened and where."""


class RegistryUnavailable(RegistryError):
    """Unreachable, too slow, failing (5xx, 429), or answering with content we refuse to use: exit 3."""


class RegistryRefused(RegistryError):
    """The registry refused us (401 after authenticating, 403): exit 1."""


class ImageNotFound(RegistryError):
    """The registry has no such tag or digest (404): exit 2."""


class InsecureRegistry(InvalidInput):
    """``--insecure-registry`` for a registry that is not on this machine."""


class TagMoved(RegistryError):
    """``REPO:TAG@DIGEST`` whose tag no longer points to the digest: exit 1."""


@dataclass(frozen=True)
class RegistryOptions:
    ca_file: Path | None = None  # CA bundle for a private registry's certificate
    insecure: bool = False  # loopback only: no TLS verification, and plain HTTP when TLS is not spoken
    docker_config: Path | None = None  # the directory of config.json (default: $DOCKER_CONFIG, ~/.docker)
    timeout_seconds: float = 30.0  # to connect, and between two reads of one response
    deadline_seconds: float = 120.0  # for reading the whole image


@dataclass(frozen=True)
class RegistryImage:
    """What the registry holds under a reference: its digest (the subject of a record) and its labels."""

    repository: str
    digest: str
    tag: str  # the tag asked for ("" when read by digest alone)
    media_type: str
    platforms: tuple[PlatformLabels, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in oci.INDEX_TYPES

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address, written literally (a name is never resolved for this)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_host(domain: str) -> str:
    """The host that serves a registry domain's API (Docker Hub's is not docker.io)."""
    return _DOCKER_HUB_API if domain == "docker.io" else domain


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Bearer realm="…",service="…",scope="…"`` as (scheme, parameters)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            break
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare or ""
        position = match.end()
    return scheme.lower(), params


def _reason(exc: requests.RequestException) -> str:
    text = str(exc)
    for known, said in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                        ("timed out", "timed out"), ("No route to host", "no route to host")):
        if known in text:
            return said
    return f"{exc.__class__.__name__}: {text[:200]}"


class _Session:
    """One registry, one repository, one command: authentication state and the deadline."""

    def __init__(self, ref: ImageReference, options: RegistryOptions) -> None:
        self.registry = ref.domain
        self.host = api_host(ref.domain)
        self.path = ref.path
        self.options = options
        self.scheme = "https"
        self.verify: str | bool = False if options.insecure else (str(options.ca_file) if options.ca_file else True)
        self.authorization: str | None = None
        self.credentials: Credentials | None = None
        self.credentials_read = False
        self.deadline = time.monotonic() + options.deadline_seconds
        self.http = requests.Session()
        # Not the environment's netrc or CA variables: credentials come from Docker's config, the CA from
        # --registry-ca-file. Proxies still come from the environment, as for docker and skopeo.
        self.http.trust_env = False
        self.http.proxies = requests.utils.get_environ_proxies(f"https://{self.host}/")
        self.http.max_redirects = MAX_REDIRECTS
        self.http.headers["User-Agent"] = USER_AGENT

    # --- transport ----------------------------------------------------------------------------

    def _timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryUnavailable(f"registry {self.registry} did not finish answering within "
                                      f"{self.options.deadline_seconds:g}s")
        return min(self.options.timeout_seconds, remaining)

    def _send(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.http.get(url, headers=headers, stream=True, verify=self.verify, timeout=self._timeout())
        except requests.exceptions.SSLError as exc:
            if self.options.insecure and self.scheme == "https" and url.startswith("https://"):
                raise _SpeaksPlainHttp from exc
            raise RegistryUnavailable(f"cannot reach registry {self.registry}: TLS verification failed "
                                      f"({_reason(exc)}); for a private CA give --registry-ca-file") from exc
        except requests.exceptions.TooManyRedirects as exc:
            raise RegistryUnavailable(f"registry {self.registry} redirected more than {MAX_REDIRECTS} times "
                                      "(a redirect loop?)") from exc
        except requests.exceptions.Timeout as exc:
            raise RegistryUnavailable(f"registry {self.registry} did not answer within "
                                      f"{self.options.timeout_seconds:g}s") from exc
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"cannot reach registry {self.registry}: {_reason(exc)}") from exc

    def body(self, response: requests.Response, limit: int, what: str) -> bytes:
        """The response body, refused as soon as it passes ``limit`` bytes or the deadline."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise RegistryUnavailable(f"{what}: the registry announced {declared} bytes, more than the {limit} "
                                      "this command reads")
        chunks: list[bytes] = []
        received = 0
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                received += len(chunk)
                if received > limit:
                    raise RegistryUnavailable(f"{what}: the registry sent more than {limit} bytes")
                self._timeout()
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"{what}: the registry's answer broke off ({_reason(exc)})") from exc
        finally:
            response.close()
        return b"".join(chunks)

    @contextmanager
    def get(self, kind: str, target: str, accept: tuple[str, ...], what: str) -> Iterator[requests.Response]:
        """GET ``/v2/<name>/<kind>/<target>``, authenticating when challenged; yields a 200 response."""
        headers = {"Accept": ", ".join(accept)} if accept else {}
        for attempt in range(3):
            url = f"{self.scheme}://{self.host}/v2/{self.path}/{kind}/{target}"
            if self.authorization:
                headers["Authorization"] = self.authorization
            try:
                response = self._send(url, headers)
            except _SpeaksPlainHttp:
                self.scheme = "http"
                continue
            if response.status_code == 401 and attempt < 2 and self._authenticate(response, challenged_with=headers):
                response.close()
                continue
            self._raise_for_status(response, what)
            try:
                yield response
            finally:
                response.close()
            return
        raise RegistryRefused(f"registry {self.registry} did not accept our authentication for {what}")

    def _error_detail(self, response: requests.Response) -> str:
        try:
            body = self.body(response, MAX_ERROR_BYTES, "error")
        except RegistryError:
            return ""
        try:
            errors = json.loads(body).get("errors") or []
            first = errors[0]
            detail = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
        except (ValueError, AttributeError, IndexError, TypeError, RecursionError):
            detail = ""
        return "".join(c for c in detail if c.isprintable())[:200]

    def _raise_for_status(self, response: requests.Response, what: str) -> None:
        status = response.status_code
        if status == 200:
            return
        detail = self._error_detail(response)
        said = f" ({detail})" if detail else ""
        if status == 401:
            raise RegistryRefused(self._refusal(what) + said)
        if status == 403:
            raise RegistryRefused(f"registry {self.registry} denied access to {what}{said}")
        if status == 404:
            raise ImageNotFound(f"{what} was not found in registry {self.registry}{said}")
        if status == 429:
            raise RegistryUnavailable(f"registry {self.registry} is rate-limiting us (429); retry later{said}")
        raise RegistryUnavailable(f"registry {self.registry} answered {status} for {what}{said}")

    # --- authentication -----------------------------------------------------------------------

    def _config(self) -> Path:
        return registry_credentials.config_path(self.options.docker_config)

    def _credentials(self) -> Credentials | None:
        if not self.credentials_read:
            self.credentials = registry_credentials.lookup(self.registry, self._config())
            self.credentials_read = True
            if self.credentials is not None and self.credentials.identity_token:
                raise registry_credentials.CredentialsError(
                    f"{self.credentials.origin} holds an identity token for {self.registry}; identity tokens are not "
                    "supported: log in with a username and a password or access token")
        return self.credentials

    def _refusal(self, what: str) -> str:
        if self.credentials is None:
            return (f"registry {self.registry} requires authentication for {what}: log in with 'docker login "
                    f"{self.registry}' (credentials are read from {self._config()})")
        return (f'registry {self.registry} refused the credentials of "{self.credentials.username}" (from '
                f"{self.credentials.origin}) for {what}")

    def _authenticate(self, response: requests.Response, challenged_with: dict[str, str]) -> bool:
        """Answer a 401's challenge; False when there is nothing new to try (the 401 then stands)."""
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        credentials = self._credentials()
        before = challenged_with.get("Authorization")
        if scheme == "basic":
            if credentials is None:
                return False
            pair = f"{credentials.username}:{credentials.password}".encode()
            self.authorization = "Basic " + base64.b64encode(pair).decode()
        elif scheme == "bearer":
            self.authorization = "Bearer " + self._token(params, credentials)
        else:
            return False
        return self.authorization != before

    def _token(self, params: dict[str, str], credentials: Credentials | None) -> str:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise RegistryUnavailable(f"registry {self.registry} asked for a token from {realm[:200]!r}, which is "
                                      "not an http(s) URL")
        if parts.scheme == "http" and not is_loopback(parts.netloc):
            raise RegistryUnavailable(f"registry {self.registry} asked for a token over plain HTTP from "
                                      f"{parts.netloc}; credentials are only sent over TLS")
        query = {"service": params.get("service", ""), "scope": params.get("scope") or f"repository:{self.path}:pull"}
        auth = (credentials.username, credentials.password) if credentials is not None else None
        try:
            answer = self.http.get(realm, params={k: v for k, v in query.items() if v}, auth=auth, stream=True,
                                   verify=self.verify, timeout=self._timeout())
        except requests.exceptions.SSLError as exc:
            raise RegistryUnavailable(f"cannot reach the token service of {self.registry}: TLS verification failed "
                                      f"({_reason(exc)})") from exc
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"cannot reach the token service of {self.registry} ({parts.netloc}): "
                                      f"{_reason(exc)}") from exc
        if answer.status_code in (401, 403):
            answer.close()
            raise RegistryRefused(self._refusal(f"{self.registry}/{self.path}") +
                                  f": its token service answered {answer.status_code}")
        if answer.status_code != 200:
            answer.close()
            raise RegistryUnavailable(f"the token service of {self.registry} answered {answer.status_code}")
        body = self.body(answer, MAX_TOKEN_BYTES, f"the token service of {self.registry}")
        try:
            document: Any = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise RegistryUnavailable(f"the token service of {self.registry} answered without a token")
        return token


class _SpeaksPlainHttp(Exception):
    """With --insecure-registry, the TLS handshake failed: the registry speaks plain HTTP."""


def _manifest(session: _Session, target: str, accept: tuple[str, ...], what: str) -> tuple[bytes, str, str]:
    """(bytes, Content-Type, Docker-Content-Digest) of one manifest."""
    with session.get("manifests", target, accept, what) as response:
        content_type = response.headers.get("Content-Type", "")
        header = response.headers.get("Docker-Content-Digest", "")
        return session.body(response, oci.MAX_MANIFEST_BYTES, what), content_type, header


def _by_digest(session: _Session, digest: str, accept: tuple[str, ...], what: str) -> tuple[bytes, str]:
    data, content_type, _ = _manifest(session, digest, accept, what)
    oci.check_digest(data, digest, what)
    return data, content_type


def _config_labels(session: _Session, manifest: oci.ImageManifest, platform: str, what: str) -> PlatformLabels:
    config = manifest.config
    with session.get("blobs", config.digest, (), f"the config of {what}") as response:
        data = session.body(response, oci.MAX_CONFIG_BYTES, f"the config of {what}")
    if len(data) != config.size:
        raise oci.ManifestError(f"the config of {what} is {len(data)} bytes, not the {config.size} its manifest says")
    oci.check_digest(data, config.digest, f"the config of {what}")
    parsed = oci.parse_config(data, f"the config of {what}")
    return PlatformLabels(platform or parsed.platform, parsed.labels)


def _read(session: _Session, ref: ImageReference) -> RegistryImage:
    asked = ref.written
    if ref.digest is not None:
        data, content_type = _by_digest(session, ref.digest, oci.ACCEPTED, asked)
        digest = ref.digest
    else:
        data, content_type, header = _manifest(session, ref.tag or "latest", oci.ACCEPTED, asked)
        digest = oci.digest_of(data)
        if header and header != digest:
            raise oci.ManifestError(f"{asked}: the registry says the manifest is {header[:80]}, but the bytes it "
                                    f"sent hash to {digest}")
    parsed = oci.parse_manifest(data, content_type, asked)
    platforms: list[PlatformLabels] = []
    if isinstance(parsed, oci.ImageIndex):
        for image in parsed.images:
            what = f"{ref.repository}@{image.digest}" + (f" ({image.platform})" if image.platform else "")
            child_data, child_type = _by_digest(session, image.digest, oci.MANIFEST_TYPES, what)
            child = oci.parse_manifest(child_data, child_type or image.media_type, what)
            if not isinstance(child, oci.ImageManifest):
                raise oci.ManifestError(f"{what} is an index inside an index; nested indexes are not supported")
            platforms.append(_config_labels(session, child, image.platform, what))
    else:
        platforms.append(_config_labels(session, parsed, "", asked))
    if ref.tag and ref.digest:
        moved, _, _ = _manifest(session, ref.tag, oci.ACCEPTED, f"{ref.repository}:{ref.tag}")
        now = oci.digest_of(moved, ref.digest.partition(":")[0])
        if now != ref.digest:
            raise TagMoved(f"{ref.repository}:{ref.tag} now points to {now}, not to {ref.digest}; the tag was pushed "
                           "again since that build")
    return RegistryImage(ref.repository, digest, ref.tag or ("" if ref.digest else "latest"), parsed.media_type,
                         tuple(platforms))


def read_image(ref: ImageReference, options: RegistryOptions) -> RegistryImage:
    """The image ``ref`` names: its digest (a tag resolved), and the labels of every platform's config.

    Raises a :class:`RegistryError`, :class:`InsecureRegistry`, a
    :class:`~webhook.registry_credentials.CredentialsError`, or a
    :class:`~webhook.core.image_manifests.ManifestError` (turned into :class:`RegistryUnavailable`).
    """
    if options.insecure and not is_loopback(ref.domain):
        raise InsecureRegistry(f"--insecure-registry is only for a registry on this machine (localhost, 127.0.0.1, "
                               f"::1); {ref.domain} must be reached over verified TLS: give its CA with "
                               "--registry-ca-file")
    session = _Session(ref, options)
    try:
        return _read(session, ref)
    except oci.ManifestError as exc:
        raise RegistryUnavailable(f"registry {ref.domain} answered with content this command refuses: {exc}") from exc
    finally:
        session.http.close()
