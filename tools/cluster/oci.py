"""One-layer OCI image archives written with the standard library alone.

Used for the images the single-node cluster needs that have no Dockerfile: the pause image, the
per-run application image and the Debian base of the project image. Layers are deterministic (mtime 0,
uid/gid 0, sorted entries, gzip without a timestamp), so the same files always give the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Entry:
    """A file, directory or symlink of a layer."""

    path: str  # relative, e.g. "bin/busybox"
    data: bytes | None = None  # file content; None for a directory or a symlink
    mode: int = 0o755
    link: str | None = None  # symlink target


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    user: str = ""
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Archive:
    path: Path
    name: str  # repository:tag recorded in the archive
    digest: str  # sha256:<manifest digest>
    size: int  # bytes of the compressed layers + config + manifest


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar_info(name: str, *, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer_from_entries(entries: Iterable[Entry]) -> bytes:
    """An uncompressed, deterministic layer tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            if entry.link is not None:
                tar.addfile(_tar_info(entry.path, kind=tarfile.SYMTYPE, mode=0o777, link=entry.link))
            elif entry.data is None:
                tar.addfile(_tar_info(entry.path, kind=tarfile.DIRTYPE, mode=entry.mode))
            else:
                tar.addfile(_tar_info(entry.path, kind=tarfile.REGTYPE, mode=entry.mode, size=len(entry.data)),
                            io.BytesIO(entry.data))
    return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as handle:
        handle.write(data)
    return buffer.getvalue()


def _config_json(config: ImageConfig, diff_id: str) -> bytes:
    inner: dict[str, object] = {"Env": list(config.env)}
    if config.entrypoint is not None:
        inner["Entrypoint"] = list(config.entrypoint)
    if config.cmd is not None:
        inner["Cmd"] = list(config.cmd)
    if config.user:
        inner["User"] = config.user
    if config.working_dir:
        inner["WorkingDir"] = config.working_dir
    if config.labels:
        inner["Labels"] = dict(config.labels)
    document = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "promotion-gate tools/cluster/oci.py"}],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def write_archive(path: Path, name: str, layer_tar: bytes, config: ImageConfig) -> Archive:
    """Write an ``oci-archive`` (an OCI image layout in a tar) holding one image named ``name``.

    ``name`` (``repository:tag``) goes into ``org.opencontainers.image.ref.name`` (what skopeo and
    buildah read) and ``io.containerd.image.name`` (what ``ctr images import`` reads).
    """
    layer = _gzip(layer_tar)
    config_blob = _config_json(config, sha256(layer_tar))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = sha256(manifest_blob)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(manifest_blob),
                       "annotations": {"org.opencontainers.image.ref.name": name,
                                       "io.containerd.image.name": name}}],
    }
    files: dict[str, bytes] = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for blob in (layer, config_blob, manifest_blob):
        files["blobs/sha256/" + sha256(blob).removeprefix("sha256:")] = blob
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            tar.addfile(_tar_info(directory, kind=tarfile.DIRTYPE, mode=0o755))
        for member, data in sorted(files.items()):
            tar.addfile(_tar_info(member, kind=tarfile.REGTYPE, mode=0o644, size=len(data)), io.BytesIO(data))
    tmp.replace(path)
    return Archive(path, name, digest, len(layer) + len(config_blob) + len(manifest_blob))


def archive_digest(path: Path) -> str:
    """The manifest digest of the (first) image in an oci-archive."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise ValueError(f"{path}: no index.json")
        index = json.load(member)
    return str(index["manifests"][0]["digest"])
