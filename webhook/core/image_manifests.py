"""OCI and Docker image manifests, indexes and configs: parsed from bytes, checked against digests.

What ``promotion-gate record`` reads from a registry arrives here as raw bytes and leaves as small
typed values. Nothing is trusted because a registry said so: a manifest's digest is the hash of the
bytes we were given (:func:`digest_of`), never a response header, and every descriptor we follow is
bounded (its size, and the number of platforms of an index). Pure: no network, no files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core import references
from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPTED = (*INDEX_TYPES, *MANIFEST_TYPES)
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution registry's own limit for a manifest
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MAX_PLATFORMS = 16  # images of an index that are read; more is refused rather than half-read
MAX_LABELS = 1024
# buildx adds provenance and SBOM manifests to an index; they describe the image, they are not one.
_ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")


class ManifestError(InvalidInput):
    """What a registry returned is not a manifest, index or config we can read; the message says why."""


_read = FieldReader(ManifestError)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: str = ""  # "linux/amd64", "linux/arm/v7"; empty when not given


@dataclass(frozen=True, slots=True)
class ImageIndex:
    """A manifest list or OCI image index: the images (one per platform) it names."""

    media_type: str
    images: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ImageManifest:
    media_type: str
    config: Descriptor


@dataclass(frozen=True, slots=True)
class ImageConfig:
    platform: str
    labels: Mapping[str, str]


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The content digest of ``data``: what a registry's digest must be, computed here."""
    if algorithm not in ("sha256", "sha512"):
        raise ManifestError(f"digest algorithm {algorithm!r} is not supported (sha256, sha512)")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def check_digest(data: bytes, expected: str, what: str) -> None:
    """Refuse bytes that do not hash to the digest they were asked for."""
    algorithm = expected.partition(":")[0]
    actual = digest_of(data, algorithm)
    if actual != expected:
        raise ManifestError(f"{what}: the registry sent content whose digest is {actual}, not {expected}")


def _json(data: bytes, what: str) -> Mapping[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{what} is not JSON") from exc
    return _read.mapping(document, what, required=True)


def _platform(value: Any, where: str) -> str:
    platform = _read.mapping(value, where)
    parts = [_read.text(platform.get(k), f"{where}.{k}", max_length=64) for k in ("os", "architecture", "variant")]
    return "/".join(p for p in parts if p)


def _descriptor(value: Any, where: str, *, max_size: int) -> Descriptor:
    item = _read.mapping(value, where, required=True)
    digest = _read.text(item.get("digest"), f"{where}.digest", required=True, max_length=200)
    if not references.is_digest(digest):
        raise ManifestError(f"{where}.digest {digest[:80]!r} is not sha256:<64 hex> or sha512:<128 hex>")
    size = _read.count(item.get("size"), f"{where}.size")
    if size > max_size:
        raise ManifestError(f"{where} is {size} bytes, more than the {max_size} this command reads")
    return Descriptor(_read.text(item.get("mediaType"), f"{where}.mediaType", max_length=255), digest, size,
                      _platform(item.get("platform"), f"{where}.platform"))


def parse_manifest(data: bytes, content_type: str, what: str) -> ImageIndex | ImageManifest:
    """An index or an image manifest, from its bytes and the Content-Type it was served with."""
    document = _json(data, what)
    declared = _read.text(document.get("mediaType"), f"{what} mediaType", max_length=255)
    served = content_type.split(";", 1)[0].strip()
    media_type = declared or served
    if declared and served in ACCEPTED and served != declared:
        raise ManifestError(f"{what} says it is {declared} but was served as {served}")
    if document.get("schemaVersion") != 2:
        raise ManifestError(f"{what} is not a schema 2 manifest (Docker schema 1 images are not supported)")
    if media_type in INDEX_TYPES or (not media_type and "manifests" in document):
        return _index(document, media_type or OCI_INDEX, what)
    if media_type in MANIFEST_TYPES or (not media_type and "config" in document):
        config = _descriptor(document.get("config"), f"{what} config", max_size=MAX_CONFIG_BYTES)
        if config.media_type not in CONFIG_TYPES:
            raise ManifestError(f"{what} is not a container image: its config is {config.media_type or 'untyped'}")
        return ImageManifest(media_type or OCI_MANIFEST, config)
    raise ManifestError(f"{what} has media type {media_type or 'none'!r}, not an image manifest or index")


def _index(document: Mapping[str, Any], media_type: str, what: str) -> ImageIndex:
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(f"{what}: manifests must be a list")
    images: list[Descriptor] = []
    for position, entry in enumerate(entries[: MAX_PLATFORMS * 4]):
        where = f"{what} manifests[{position}]"
        annotations = _read.mapping(_read.mapping(entry, where, required=True).get("annotations"),
                                    f"{where}.annotations")
        descriptor = _descriptor(entry, where, max_size=MAX_MANIFEST_BYTES)
        if annotations.get(_ATTESTATION[0]) == _ATTESTATION[1] or descriptor.platform.startswith("unknown"):
            continue
        if descriptor.media_type in INDEX_TYPES:
            raise ManifestError(f"{where} is an index inside an index; nested indexes are not supported")
        images.append(descriptor)
    if len(entries) > MAX_PLATFORMS * 4 or len(images) > MAX_PLATFORMS:
        raise ManifestError(f"{what} names more than {MAX_PLATFORMS} images; this command reads at most "
                            f"{MAX_PLATFORMS} platforms")
    if not images:
        raise ManifestError(f"{what} names no image")
    return ImageIndex(media_type, tuple(images))


def parse_config(data: bytes, what: str) -> ImageConfig:
    """An image config's platform and labels (``config.Labels``)."""
    document = _json(data, what)
    parts = [_read.text(document.get(k), f"{what} {k}", max_length=64) for k in ("os", "architecture", "variant")]
    config = _read.mapping(document.get("config"), f"{what} config")
    raw = config.get("Labels")
    labels = _read.string_map(raw, f"{what} config.Labels") if raw is not None else {}
    if len(labels) > MAX_LABELS:
        raise ManifestError(f"{what} has more than {MAX_LABELS} labels")
    return ImageConfig("/".join(p for p in parts if p), labels)
