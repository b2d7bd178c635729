"""Test kit for the promotion scenarios: keys, tokens and a policy file written into a directory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from webhook import key_files
from webhook.core import dsse, keys, records
from webhook.core.records import RecordKind

REPOSITORY = "ghcr.io/acme/payment-api"
DIGEST = "sha256:f8a2" + "0" * 60
IMAGE = f"{REPOSITORY}@{DIGEST}"
KEY_NAMES = ("ci", "release", "approver-a", "approver-b", "outsider")
TOKENS = {  # identity -> (token, environments)
    "ci-bot": ("ci-token-0123456789", ["ci", "staging"]),
    "release-bot": ("release-token-0123456789", ["staging", "production"]),
    "reader": ("reader-token-0123456789", []),
}


@dataclass
class Kit:
    root: Path
    policy_path: Path

    def key(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.pem"

    def signing_key(self, name: str) -> keys.SigningKey:
        return key_files.load_signing_key(self.key(name))

    def token_file(self, identity: str) -> Path:
        return self.root / f"{identity}.token"

    def token(self, identity: str) -> str:
        return TOKENS[identity][0]


def policy_document(root: Path, *, mode: str = "enforce", extra: dict[str, object] | None = None) -> dict[str, object]:
    document: dict[str, object] = {
        "apiVersion": "promotion-gate.io/v1",
        "kind": "Policy",
        "defaultMode": mode,
        "keys": {name: {"publicKeyFile": str(root / "keys" / f"{name}.pem.pub")} for name in KEY_NAMES
                 if name != "outsider"},
        "environments": [
            {"name": "ci", "trustedKeys": ["ci"], "evidence": {
                "maxTestsFailed": 0, "minTestsPassed": 1, "maxScanFindings": {"critical": 0, "high": 0},
                "requireSource": True}},
            {"name": "staging", "trustedKeys": ["ci", "release"]},
            {"name": "production", "trustedKeys": ["release", "approver-a", "approver-b"], "requiredSignatures": 2},
        ],
        "namespaces": {"environments": {"payments-ci": "ci", "payments-staging": "staging",
                                        "payments-prod": "production"},
                       "unmapped": "deny"},
        "breakGlass": {"users": ["oncall@example.com"], "groups": ["platform-oncall"]},
        "store": {"timeoutSeconds": 2, "cacheSeconds": 30},
        "audit": {"onWriteFailure": "deny", "checkpointEvery": 5},
        "api": {"tokens": [{"identity": identity, "sha256": hashlib.sha256(token.encode()).hexdigest(),
                            "environments": envs} for identity, (token, envs) in TOKENS.items()]},
    }
    if extra:
        document.update(extra)
    return document


def make_kit(root: Path, **policy_options: object) -> Kit:
    (root / "keys").mkdir(parents=True, exist_ok=True)
    for name in KEY_NAMES:
        private = root / "keys" / f"{name}.pem"
        if not private.exists():
            key_files.write_key_pair(keys.generate("ecdsa-p256" if name == "approver-b" else "ed25519"), private,
                                private.with_name(private.name + ".pub"))
    for identity, (token, _) in TOKENS.items():
        (root / f"{identity}.token").write_text(token + "\n")
    policy_path = root / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy_document(root, **policy_options)))  # type: ignore[arg-type]
    return Kit(root, policy_path)


def ci_record(repository: str = REPOSITORY, digest: str = DIGEST, **changes: Any) -> records.Record:
    fields: dict[str, Any] = dict(
        kind=RecordKind.PROMOTION, repository=repository, digest=digest, environment="ci", promoted_from=None,
        at="2026-11-25T10:00:00Z", by="ci-bot", source=records.Source("4f2c9e1", "github.com/acme/payment-api",
                                                                        "run-8812", "https://ci.example/run/8812"),
        tests=records.Tests(120, 0), scan=records.Scan("trivy", {"critical": 0, "high": 0, "medium": 3}),
        approvers=(), reason="build")
    fields.update(changes)
    return records.Record(**fields)


def envelope(kit: Kit, record: records.Record, *signers: str) -> dsse.Envelope:
    return dsse.sign(records.payload(record), [kit.signing_key(s) for s in signers])


def cli(*args: str, stdin: str | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webhook.cli", *args], capture_output=True, text=True,
                          input=stdin, cwd=cwd, timeout=120, env=None if env is None else {**os.environ, **env})
