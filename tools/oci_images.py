"""Container images made by the tests: layers, configs with labels, indexes, in an OCI image layout.

A layout directory is what ``skopeo copy oci:DIR:TAG docker://…`` pushes, so the tests push their
images with a real client. The bytes are deterministic (no timestamps), and each builder returns the
digest it wrote, so a test knows the digest the registry must report before it asks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class Layout:
    """An OCI image layout directory: blobs by digest, and ``index.json`` naming tagged images."""

    root: Path
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    def _layer(self, text: str) -> tuple[dict[str, Any], str]:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = text.encode()
            info = tarfile.TarInfo("app/build.txt")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        uncompressed = raw.getvalue()
        digest, size = self.blob(gzip.compress(uncompressed, mtime=0))
        return ({"mediaType": OCI_LAYER, "digest": digest, "size": size},
                "sha256:" + hashlib.sha256(uncompressed).hexdigest())

    def image(self, labels: dict[str, str], *, architecture: str = "amd64", content: str = "build") -> dict[str, Any]:
        """One image (a layer and a config with ``labels``); returns its manifest's descriptor."""
        layer, diff_id = self._layer(f"{content} {architecture}\n")
        config = {"architecture": architecture, "os": "linux", "config": {"Labels": labels, "Cmd": ["/app"]},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        config_digest, config_size = self.blob(_canonical(config))
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                    "layers": [layer]}
        digest, size = self.blob(_canonical(manifest))
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                "platform": {"os": "linux", "architecture": architecture}}

    def index(self, images: list[dict[str, Any]]) -> dict[str, Any]:
        """An image index over ``images`` (each a descriptor from :meth:`image`)."""
        digest, size = self.blob(_canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": images}))
        return {"mediaType": OCI_INDEX, "digest": digest, "size": size}

    def tag(self, name: str, descriptor: dict[str, Any]) -> str:
        """Name ``descriptor`` ``name`` in the layout; returns its digest."""
        entry = {key: descriptor[key] for key in ("mediaType", "digest", "size")}
        self.tags[name] = {**entry, "annotations": {"org.opencontainers.image.ref.name": name}}
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": list(self.tags.values())}))
        return str(descriptor["digest"])


def push(layout: Layout, tag: str, destination: str, *, cert_dir: Path | None = None,
         credentials: tuple[str, str] | None = None, insecure: bool = False) -> str:
    """``skopeo copy --all`` one tagged image (or index) of the layout to ``destination``; returns its digest."""
    digest_file = layout.root / f"{tag}.pushed-digest"
    args = ["skopeo", "copy", "--all", "--preserve-digests", "--retry-times", "0", "--digestfile", str(digest_file)]
    if cert_dir is not None:
        args += ["--dest-cert-dir", str(cert_dir)]
    if credentials is not None:
        args += ["--dest-creds", f"{credentials[0]}:{credentials[1]}"]
    if insecure:
        args += ["--dest-tls-verify=false"]
    args += [f"oci:{layout.root}:{tag}", f"docker://{destination}"]
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    return digest_file.read_text().strip()
