"""Development secrets for `make run`: signing keys and an API token under ./var (created once)."""

from __future__ import annotations

import hashlib
import secrets
import sys
from pathlib import Path

import yaml

from webhook import key_files
from webhook.core import keys

KEY_NAMES = ("ci", "release", "approver-a", "approver-b")


def main(var: Path) -> None:
    (var / "keys").mkdir(parents=True, exist_ok=True)
    for name in KEY_NAMES:
        private = var / "keys" / f"{name}.pem"
        if not private.exists():
            key_files.write_key_pair(keys.generate(), private, private.with_name(private.name + ".pub"))
    server_key = var / "server-key.pem"
    if not server_key.exists():
        key_files.write_key_pair(keys.generate(), server_key, server_key.with_name(server_key.name + ".pub"))
    token_file, tokens = var / "dev-token", var / "tokens.yaml"
    if not token_file.exists() or not tokens.exists():
        token = secrets.token_urlsafe(32)
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        tokens.write_text(yaml.safe_dump([{
            "identity": "developer", "sha256": hashlib.sha256(token.encode()).hexdigest(), "admin": True,
        }]))
    print(f"development keys in {var / 'keys'}, API token in {token_file}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var"))
