"""The seed story, for real: CLI -> HTTPS API -> store -> admission, on both backends."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tools.promotion_kit import DIGEST, IMAGE, REPOSITORY, Kit, cli, make_kit
from tools.reviews import review, workload
from tools.servers import RunningServer


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


@pytest.fixture
def gate(server_factory, kit: Kit, store_url: str, tmp_path: Path) -> RunningServer:  # type: ignore[no-untyped-def]
    server_key = tmp_path / "kit" / "keys" / "ci.pem"  # any key works as the server's checkpoint key
    server: RunningServer = server_factory(policy=kit.policy_path.read_text(), store=store_url,
                                           extra=["--server-key", str(server_key)])
    return server


def remote(gate: RunningServer, kit: Kit, identity: str) -> list[str]:
    return ["--server", gate.url, "--token-file", str(kit.token_file(identity)), "--ca-file", str(gate.ca)]


def admit(gate: RunningServer, namespace: str, image: str = IMAGE) -> dict:  # type: ignore[type-arg]
    body = review(workload("Pod", [image], name="api-7d9", namespace=namespace))
    return gate.post("/validate", json=body).json()["response"]  # type: ignore[no-any-return]


def test_seed_story(gate: RunningServer, kit: Kit) -> None:
    built = cli("record", IMAGE, "--no-registry", "--env", "ci", "--git-commit", "4f2c9e1", "--git-repository",
                "github.com/acme/payment-api", "--ci-run", "8812", "--ci-run-url", "https://ci.example/run/8812",
                "--tests-passed", "120", "--tests-failed", "0", "--scanner", "trivy", "--scan-critical", "0",
                "--scan-high", "0", "--key", str(kit.key("ci")), "--by", "ci-bot", *remote(gate, kit, "ci-bot"))
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith(f"{REPOSITORY}@{DIGEST} recorded for ci: record ")

    promoted = cli("promote", IMAGE, "--to", "staging", "--key", str(kit.key("ci")), *remote(gate, kit, "ci-bot"))
    assert promoted.returncode == 0, promoted.stderr

    assert admit(gate, "payments-staging")["allowed"] is True
    denied = admit(gate, "payments-prod")
    assert denied["allowed"] is False
    assert denied["status"]["message"] == (
        f'[not-promoted] Pod payments-prod/api-7d9 spec.containers[0] "c0": {IMAGE} has no promotion record for '
        f'environment "production" (promoted to: ci, staging). Promote it: promotion-gate promote {IMAGE} '
        "--to production")

    one_approval = cli("promote", IMAGE, "--to", "production", "--key", str(kit.key("release")),
                       *remote(gate, kit, "release-bot"))
    assert one_approval.returncode == 1
    assert one_approval.stderr.startswith(
        'error: 422: rule signatures: environment "production" requires 2 signature(s) from distinct trusted keys, '
        "found 1")

    approved = cli("promote", IMAGE, "--to", "production", "--key", str(kit.key("release")), "--key",
                   str(kit.key("approver-a")), "--approver", "alice", "--approver", "bob",
                   "--reason", "CHG-1042", *remote(gate, kit, "release-bot"))
    assert approved.returncode == 0, approved.stderr
    assert admit(gate, "payments-prod")["allowed"] is True

    revoked = cli("revoke", IMAGE, "--env", "production", "--reason", "CVE-2026-0001", "--key",
                  str(kit.key("release")), *remote(gate, kit, "release-bot"))
    assert revoked.returncode == 0, revoked.stderr
    again = admit(gate, "payments-prod")
    assert again["allowed"] is False
    assert again["status"]["message"].startswith("[not-promoted] Pod payments-prod/api-7d9")

    traced = cli("trace", DIGEST, "--output", "json", *remote(gate, kit, "reader"))
    assert traced.returncode == 0, traced.stderr
    trace = json.loads(traced.stdout)
    assert [(r["environment"], r["promotedFrom"]) for r in trace["records"]] == [
        ("ci", None), ("staging", "ci"), ("production", "staging")]
    assert trace["records"][0]["source"] == {"gitCommit": "4f2c9e1", "repository": "github.com/acme/payment-api",
                                             "ciRunId": "8812", "ciRunUrl": "https://ci.example/run/8812"}
    assert trace["records"][0]["tests"] == {"passed": 120, "failed": 0}
    assert trace["records"][2]["approvers"] == ["alice", "bob"]
    assert [r["reason"] for r in trace["revocations"]] == ["CVE-2026-0001"]
    assert trace["states"][REPOSITORY]["production"]["state"] == "not-promoted"
    assert [(a["namespace"], a["allowed"]) for a in trace["admissions"]] == [
        ("payments-staging", True), ("payments-prod", False), ("payments-prod", True), ("payments-prod", False)]

    human = cli("trace", DIGEST, *remote(gate, kit, "reader"))
    assert f"  {REPOSITORY}: ci: promoted, staging: promoted, production: not-promoted" in human.stdout
    assert "      tests: 120 passed, 0 failed" in human.stdout


def test_tag_is_refused_with_how_to_get_the_digest(gate: RunningServer, kit: Kit) -> None:
    promoted = cli("promote", "ghcr.io/acme/payment-api:1.4", "--to", "staging", "--key", str(kit.key("ci")),
                   *remote(gate, kit, "ci-bot"))
    assert promoted.returncode == 2
    assert ('"ghcr.io/acme/payment-api:1.4" is a tag, not a digest; records are about one immutable build. Get its '
            "digest with 'crane digest ghcr.io/acme/payment-api:1.4' or 'docker buildx imagetools inspect "
            "ghcr.io/acme/payment-api:1.4', then use ghcr.io/acme/payment-api@sha256:<digest>") in " ".join(
                promoted.stderr.split())
    offline = cli("record", "ghcr.io/acme/payment-api:1.4", "--no-registry", "--env", "ci", "--key",
                  str(kit.key("ci")), *remote(gate, kit, "ci-bot"))
    assert offline.returncode == 2
    assert ('"ghcr.io/acme/payment-api:1.4" is a tag; only the registry can resolve it to a digest: drop '
            "--no-registry, or give IMAGE by digest (REPO@sha256:…)") in " ".join(offline.stderr.split())


def test_acknowledged_record_survives_a_crash(server_factory, kit: Kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    gate = server_factory(policy=kit.policy_path.read_text(), store=url)
    result = cli("record", IMAGE, "--no-registry", "--env", "ci", "--git-commit", "c", "--ci-run", "1", "--tests-passed", "1",
                 "--tests-failed", "0", "--scan-critical", "0", "--scan-high", "0", "--key", str(kit.key("ci")),
                 *remote(gate, kit, "ci-bot"))
    assert result.returncode == 0, result.stderr
    gate.process.send_signal(signal.SIGKILL)  # no clean shutdown
    gate.process.wait()
    restarted = server_factory(policy=kit.policy_path.read_text(), store=url)
    history = cli("history", REPOSITORY, "--output", "json", *remote(restarted, kit, "reader"))
    assert [r["environment"] for r in json.loads(history.stdout)] == ["ci"]


def test_a_revocation_upstream_is_not_undone_by_a_lower_trust_key(gate: RunningServer, kit: Kit) -> None:
    """The red-team case: revoke staging, re-promote it with the CI key alone, try production again."""
    ci_evidence = ["--git-commit", "c", "--ci-run", "1", "--tests-passed", "1", "--tests-failed", "0",
                   "--scan-critical", "0", "--scan-high", "0"]
    steps = [
        ("record", IMAGE, "--no-registry", "--env", "ci", *ci_evidence, "--key", str(kit.key("ci")), *remote(gate, kit, "ci-bot")),
        ("promote", IMAGE, "--to", "staging", "--key", str(kit.key("ci")), *remote(gate, kit, "ci-bot")),
        ("promote", IMAGE, "--to", "production", "--key", str(kit.key("release")), "--key",
         str(kit.key("approver-a")), *remote(gate, kit, "release-bot")),
    ]
    for step in steps:
        assert cli(*step).returncode == 0
    assert admit(gate, "payments-prod")["allowed"] is True
    revoked = cli("revoke", IMAGE, "--env", "staging", "--reason", "CVE-2026-0002", "--key", str(kit.key("ci")),
                  *remote(gate, kit, "ci-bot"))
    assert revoked.returncode == 0, revoked.stderr
    again = cli("promote", IMAGE, "--to", "staging", "--key", str(kit.key("ci")), "--reason", "rebuilt",
                *remote(gate, kit, "ci-bot"))
    assert again.returncode == 0, again.stderr
    assert admit(gate, "payments-staging")["allowed"] is True
    denied = admit(gate, "payments-prod")
    assert denied["allowed"] is False
    assert denied["status"]["message"] == (
        f'[not-promoted] Pod payments-prod/api-7d9 spec.containers[0] "c0": {IMAGE} has no promotion record for '
        f'environment "production" (promoted to: ci, staging; revoked from staging). Promote it: '
        f"promotion-gate promote {IMAGE} --to production")
    # Production's own two signatures, given again, admit it again.
    assert cli(*steps[2]).returncode == 0
    assert admit(gate, "payments-prod")["allowed"] is True
