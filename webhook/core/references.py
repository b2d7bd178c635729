"""Container image references: the OCI/Docker grammar with Docker's normalisation.

Container runtimes parse a Pod's ``image`` field with ``reference.ParseNormalizedNamed`` from the
distribution project; this module reproduces that grammar so that our verdicts agree with what the
kubelet will actually pull. It is written by hand (no Python port of the grammar is maintained) and
kept small: one regular expression per production, the same names as the Go source.

A reference is *pinned* only when it carries a well-formed digest of a registered algorithm:
``sha256`` with exactly 64 lowercase hex characters or ``sha512`` with exactly 128. A reference with
both a tag and a digest is pinned: the runtime pulls by digest and the tag is only a label.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from webhook.core.errors import InvalidInput

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPOSITORY_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255
MAX_REFERENCE_LENGTH = 4096

_ALPHA_NUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHA_NUMERIC}(?:{_SEPARATOR}{_ALPHA_NUMERIC})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

# Every pattern is applied with fullmatch: a "$" would also match before a trailing newline.
_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?",
    re.ASCII,
)
_ANCHORED_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
_REGISTERED_DIGESTS = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


class Pinning(enum.Enum):
    PINNED = "pinned"
    MUTABLE_TAG = "mutable-tag"
    INVALID = "invalid"


class InvalidReference(InvalidInput):
    """The text is not a reference a container runtime would accept (or pin)."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed, normalised image reference.

    ``written`` is the text as it appeared in the manifest; ``written_name`` its name part without
    tag or digest, which is what we quote back to people in a suggested fix.
    """

    written: str
    written_name: str
    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """Normalised repository, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    @property
    def pinned(self) -> bool:
        return self.digest is not None

    @property
    def implicit_latest(self) -> bool:
        return self.tag is None and self.digest is None

    @property
    def canonical(self) -> str:
        """Fully normalised form: ``docker.io/library/busybox:latest`` or ``repo@sha256:…``."""
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"

    @property
    def pinned_form(self) -> str:
        """The digest form as a person would write it: the written name plus ``@digest``."""
        return f"{self.written_name}@{self.digest}" if self.digest else self.written_name


_TAG_RE = re.compile(_TAG, re.ASCII)


def is_tag(text: str) -> bool:
    """True for a well-formed tag (``abc123``, ``1.4``): what may follow the ``:`` of a reference."""
    return isinstance(text, str) and _TAG_RE.fullmatch(text) is not None


def is_digest(text: str) -> bool:
    """True for a well-formed, registered digest (``sha256:<64 hex>`` or ``sha512:<128 hex>``)."""
    return isinstance(text, str) and DIGEST_RE.fullmatch(text) is not None


def _split_docker_domain(name: str) -> tuple[str, str]:
    # Mirrors distribution's splitDockerDomain: the first component is a registry host only if it
    # looks like one (has '.' or ':', is 'localhost', or has an uppercase letter).
    first, sep, rest = name.partition("/")
    if not sep or (
        "." not in first and ":" not in first and first != "localhost" and first.lower() == first
    ):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPOSITORY_PREFIX + remainder
    return domain, remainder


def parse(text: str) -> ImageReference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` with a readable reason."""
    if not isinstance(text, str):
        raise InvalidReference("image must be a string")
    if text == "":
        raise InvalidReference("image is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(f"image is longer than {MAX_REFERENCE_LENGTH} characters")
    if text != text.strip():
        raise InvalidReference("image has leading or trailing whitespace")
    if not text.isascii():
        raise InvalidReference("image contains non-ASCII characters")
    if _ANCHORED_IDENTIFIER_RE.fullmatch(text):
        raise InvalidReference("image is a bare 64-character hex identifier, not a repository name")

    name_part, at, digest_part = text.partition("@")
    name_and_tag = name_part
    # A ':' after the last '/' separates the tag; one before it belongs to a registry port.
    last_slash = name_and_tag.rfind("/")
    colon = name_and_tag.rfind(":")
    written_name = name_and_tag[:colon] if colon > last_slash else name_and_tag
    if not written_name:
        raise InvalidReference("image has no repository name")

    domain, remainder = _split_docker_domain(written_name)
    if remainder.lower() != remainder:
        raise InvalidReference("repository name must be lowercase")

    match = _REFERENCE_RE.fullmatch(text)
    if match is None:
        raise InvalidReference(_explain_mismatch(name_part, written_name, at, digest_part))
    tag = match.group("tag")
    digest = match.group("digest")
    # distribution measures the normalised name (domain included) against the limit.
    if len(f"{domain}/{remainder}") > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if digest is not None:
        _check_registered_digest(digest)
    return ImageReference(
        written=text, written_name=written_name, domain=domain, path=remainder, tag=tag, digest=digest
    )


def _check_registered_digest(digest: str) -> None:
    algorithm, _, encoded = digest.partition(":")
    pattern = _REGISTERED_DIGESTS.get(algorithm)
    if pattern is None:
        raise InvalidReference(
            f'digest algorithm "{algorithm}" is not supported; pin with sha256 (64 lowercase hex characters)'
        )
    if not pattern.fullmatch(encoded):
        expected = 64 if algorithm == "sha256" else 128
        raise InvalidReference(
            f"{algorithm} digest must be exactly {expected} lowercase hex characters "
            f"(got {len(encoded)}{', with uppercase' if encoded.lower() != encoded else ''})"
        )


def _explain_mismatch(name_part: str, written_name: str, at: str, digest_part: str) -> str:
    if at and not re.fullmatch(_DIGEST, digest_part, re.ASCII):
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*:[0-9a-fA-F]*", digest_part, re.ASCII):
            algorithm, _, encoded = digest_part.partition(":")
            if algorithm in _REGISTERED_DIGESTS:
                expected = 64 if algorithm == "sha256" else 128
                return f"{algorithm} digest must be exactly {expected} lowercase hex characters (got {len(encoded)})"
        return f'"@{digest_part}" is not a digest (expected sha256:<64 lowercase hex characters>)'
    tag = name_part[len(written_name) + 1 :] if len(name_part) > len(written_name) else None
    if tag is not None and not re.fullmatch(_TAG, tag, re.ASCII):
        if len(tag) > 128:
            return "tag is longer than 128 characters"
        return f'tag "{tag}" is not valid (letters, digits, "_", "." and "-"; must not start with "." or "-")'
    if "//" in written_name or written_name.endswith("/") or written_name.startswith("/"):
        return "repository name has an empty path component"
    return "repository name is not valid (lowercase letters, digits and separators \".\", \"_\", \"-\" between them)"


@dataclass(frozen=True, slots=True)
class Classification:
    pinning: Pinning
    reference: ImageReference | None
    problem: str | None = None


@functools.lru_cache(maxsize=16384)
def classify(text: str) -> Classification:
    """Pinned, mutable tag (explicit or implicit ``latest``), or invalid — never raises.

    Memoised: the same few images arrive again and again (every Pod of a ReplicaSet), and the
    result is an immutable value.
    """
    try:
        ref = parse(text)
    except InvalidReference as exc:
        return Classification(Pinning.INVALID, None, str(exc))
    return Classification(Pinning.PINNED if ref.pinned else Pinning.MUTABLE_TAG, ref)
