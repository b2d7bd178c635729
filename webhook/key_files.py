"""Signing keys on disk: read with a size limit, written with mode 0600 from the first byte."""

from __future__ import annotations

import os
from pathlib import Path

from webhook.core import keys
from webhook.core.keys import InvalidKey

MAX_KEY_FILE_BYTES = 64 * 1024


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise InvalidKey(f"{path}: key file is larger than {MAX_KEY_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidKey(f"{path}: cannot read key file: {exc.strerror}") from exc


def load_signing_key(path: Path) -> keys.SigningKey:
    return keys.parse_private_key(_read(path), str(path))


def load_verifying_key(path: Path) -> keys.VerifyingKey:
    return keys.parse_any_key(_read(path), str(path))


def write_key_pair(key: keys.SigningKey, private_path: Path, public_path: Path) -> None:
    """Write the private key with mode 0600 (created that way, never briefly readable)."""
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(keys.private_pem(key))
    public_path.write_bytes(key.verifying.public_pem())
