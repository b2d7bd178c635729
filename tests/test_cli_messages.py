"""CLI output people read, asserted literally: keys, certs, local-store records, history, audit."""

from __future__ import annotations

import stat
from pathlib import Path

from tools.promotion_kit import DIGEST, IMAGE, REPOSITORY, cli, make_kit
from webhook import key_files


def test_keys_generate_show_and_refuse_to_overwrite(tmp_path: Path) -> None:
    private = tmp_path / "ci.pem"
    made = cli("keys", "generate", "--out", str(private), "--algorithm", "ecdsa-p256")
    assert made.returncode == 0, made.stderr
    key_id = key_files.load_signing_key(private).key_id
    assert made.stdout == f"private key: {private}\npublic key:  {private}.pub\nkey id:      {key_id}\n"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    shown = cli("keys", "show", f"{private}.pub")
    assert shown.stdout == f"{key_id}  ecdsa-p256\n"
    again = cli("keys", "generate", "--out", str(private))
    assert (again.returncode, again.stderr) == (1, f"Error: {private} exists; refusing to overwrite a key\n")
    missing = cli("keys", "show", str(tmp_path / "nope.pem"))
    assert missing.stderr == f"Error: {tmp_path / 'nope.pem'}: cannot read key file: No such file or directory\n"


def test_certs_are_made_once(tmp_path: Path) -> None:
    target = tmp_path / "certs"
    first = cli("certs", "--dir", str(target))
    assert first.stdout == (f"CA certificate:      {target}/ca.crt\nserving certificate: {target}/tls.crt\n"
                            f"serving key:         {target}/tls.key\n")
    before = (target / "tls.crt").read_bytes()
    cli("certs", "--dir", str(target))
    assert (target / "tls.crt").read_bytes() == before  # kept, not regenerated


def test_local_store_history_promote_and_audit_messages(tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    local = ["--store", f"sqlite:///{tmp_path / 's.db'}", "--policy", str(kit.policy_path)]
    recorded = cli("record", IMAGE, "--no-registry", "--env", "ci", "--git-commit", "c0ffee", "--ci-run", "7", "--tests-passed", "3",
                   "--tests-failed", "0", "--scan-critical", "0", "--scan-high", "0", "--key", str(kit.key("ci")),
                   "--by", "ci-bot", *local)
    assert recorded.returncode == 0, recorded.stderr
    record_id = recorded.stdout.rsplit(" ", 1)[1].strip()

    unknown = cli("promote", IMAGE, "--to", "qa", "--key", str(kit.key("ci")), *local)
    assert unknown.returncode == 2
    assert "Invalid value for --to: no environment \"qa\" (defined: ci, staging, production)" in unknown.stderr

    history = cli("history", REPOSITORY, *local)
    line, *custody = history.stdout.splitlines()
    assert line.startswith("#1 ")
    assert line.endswith(f" {REPOSITORY}@{DIGEST} -> ci by ci-bot (record {record_id[:12]})")
    ci_key = kit.signing_key("ci").key_id
    assert custody == ["      source: git commit c0ffee, CI run 7", "      not confirmed by image labels",
                       "      tests: 3 passed, 0 failed", "      scan: critical 0, high 0",
                       f"      signed by: ci ({ci_key[:12]})"]
    assert cli("history", "ghcr.io/acme/unknown", *local).stdout == "no records for ghcr.io/acme/unknown\n"

    checkpoint = cli("audit", "checkpoint", "--store", local[1], "--key", str(kit.key("release")))
    assert (checkpoint.returncode, checkpoint.stderr.strip()) == (1, "Error: the audit log is empty; nothing to checkpoint")
