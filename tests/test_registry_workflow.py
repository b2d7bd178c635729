"""The seed's workflow end to end, with a real registry: build-push, record REPO:TAG, promote, deploy, trace.

And what happens when the tag moves afterwards: the record keeps its digest, admission still refuses
the tag but names the promoted digest, and ``pin`` writes that digest, not the tag's new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Images
from tools.oci_images import Layout, push
from tools.promotion_kit import Kit, cli, make_kit
from tools.registries import docker_config
from tools.reviews import review, workload
from tools.servers import RunningServer

SHA = "9b1e2c3d4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"
EVIDENCE = ["--tests-passed", "1432", "--tests-failed", "0", "--scanner", "trivy 0.55", "--scan-critical", "0",
            "--scan-high", "0"]


def remote(gate: RunningServer, kit: Kit, identity: str) -> list[str]:
    return ["--server", gate.url, "--token-file", str(kit.token_file(identity)), "--ca-file", str(gate.ca)]


def build_and_push(images: Images, tmp_path: Path, repository: str, tag: str, content: str) -> str:
    """docker build --label git.commit=… --label ci.run=… && docker push, as the seed's pipeline does."""
    layout = Layout(tmp_path / f"layout-{content}")
    labels = {"git.commit": SHA, "ci.run": "8812345", "org.opencontainers.image.revision": SHA,
              "org.opencontainers.image.source": "https://github.com/acme/payment-api"}
    layout.tag(tag, layout.index([layout.image(labels, architecture="amd64", content=content),
                                  layout.image(labels, architecture="arm64", content=content)]))
    return push(layout, tag, f"{images.registry.host}/{repository}:{tag}", cert_dir=images.registry.cert_dir,
                credentials=("ci-bot", "correct-horse"))


def admit(gate: RunningServer, namespace: str, image: str) -> dict:  # type: ignore[type-arg]
    body = review(workload("Deployment", [image], name="payment-api", namespace=namespace))
    return gate.post("/validate", json=body).json()["response"]  # type: ignore[no-any-return]


def registry_flags(images: Images, tmp_path: Path) -> list[str]:
    config = docker_config(tmp_path / "docker", {images.registry.host: ("ci-bot", "correct-horse")})
    return ["--registry-ca-file", str(images.registry.ca), "--docker-config", str(config)]


def test_the_seed_workflow_from_build_to_trace(images: Images, server_factory, store_url: str,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    gate: RunningServer = server_factory(policy=kit.policy_path.read_text(), store=store_url)
    repository = f"{images.registry.host}/acme/payment-api"
    digest = build_and_push(images, tmp_path, "acme/payment-api", SHA[:7], "seed")

    recorded = cli("record", f"{repository}:{SHA[:7]}", "--env", "ci", *EVIDENCE, "--ci-run-url",
                   "https://github.com/acme/payment-api/actions/runs/8812345", "--key", str(kit.key("ci")),
                   "--by", "ci-bot", *registry_flags(images, tmp_path), *remote(gate, kit, "ci-bot"))
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout.startswith(f"{repository}@{digest} recorded for ci: record ")
    promoted = cli("promote", f"{repository}@{digest}", "--to", "staging", "--key", str(kit.key("ci")),
                   "--by", "ci-bot", *remote(gate, kit, "ci-bot"))
    assert promoted.returncode == 0, promoted.stderr

    assert admit(gate, "payments-staging", f"{repository}@{digest}")["allowed"] is True
    tagged = admit(gate, "payments-staging", f"{repository}:{SHA[:7]}")
    assert (tagged["allowed"], tagged["status"]["message"]) == (False, (
        f'[mutable-tag] Deployment payments-staging/payment-api spec.template.spec.containers[0] "c0": image '
        f'"{repository}:{SHA[:7]}" is a mutable tag; the digest promoted to staging for :{SHA[:7]} is '
        f"{repository}@{digest}"))

    traced = cli("trace", digest, *remote(gate, kit, "reader"))
    assert traced.returncode == 0, traced.stderr
    ci_key = kit.signing_key("ci").key_id[:12]
    lines = traced.stdout.splitlines()
    first = lines.index("records:") + 1
    assert lines[first].endswith(f"{repository}@{digest} -> ci by ci-bot (record {lines[first][-13:-1]})")
    assert lines[first + 1:first + 7] == [
        f"      built as :{SHA[:7]}",
        f"      source: git commit {SHA}, CI run 8812345 (https://github.com/acme/payment-api/actions/runs/8812345), "
        "repository https://github.com/acme/payment-api",
        "      confirmed by image labels: git commit, CI run, source repository",
        "      tests: 1432 passed, 0 failed",
        "      scan: trivy 0.55: critical 0, high 0",
        f"      signed by: ci ({ci_key})"]
    assert lines[first + 7].endswith(f"-> staging from ci by ci-bot (record {lines[first + 7][-13:-1]})")
    assert lines[first + 8] == f"      signed by: ci ({ci_key})"
    as_json = json.loads(cli("trace", digest, "--output", "json", *remote(gate, kit, "reader")).stdout)
    assert as_json["records"][0]["signedBy"] == [{"keyId": kit.signing_key("ci").key_id, "name": "ci",
                                                  "verified": True}]
    assert (as_json["records"][0]["builtAs"], as_json["records"][1]["builtAs"]) == (SHA[:7], None)


def test_a_tag_moved_after_recording(images: Images, server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kit = make_kit(tmp_path / "kit")
    gate: RunningServer = server_factory(policy=kit.policy_path.read_text(),
                                         store=f"sqlite:///{tmp_path / 'store.db'}")
    repository = f"{images.registry.host}/acme/moving"
    built = build_and_push(images, tmp_path, "acme/moving", "abc123", "first build")
    assert cli("record", f"{repository}:abc123", "--env", "ci", *EVIDENCE, "--key", str(kit.key("ci")),
               *registry_flags(images, tmp_path), *remote(gate, kit, "ci-bot")).returncode == 0
    assert cli("promote", f"{repository}@{built}", "--to", "staging", "--key", str(kit.key("ci")),
               *remote(gate, kit, "ci-bot")).returncode == 0
    moved = build_and_push(images, tmp_path, "acme/moving", "abc123", "pushed over it")
    assert moved != built

    denied = admit(gate, "payments-staging", f"{repository}:abc123")
    assert denied["status"]["message"].endswith(
        f"is a mutable tag; the digest promoted to staging for :abc123 is {repository}@{built}")
    assert admit(gate, "payments-staging", f"{repository}@{built}")["allowed"] is True
    assert admit(gate, "payments-staging", f"{repository}@{moved}")["allowed"] is False
    not_yet = admit(gate, "payments-prod", f"{repository}:abc123")["status"]["message"]
    assert not_yet.endswith(f'is a mutable tag; deploy by digest: {repository}@sha256:<digest>')

    manifest = tmp_path / "deploy.yaml"
    manifest.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n"
                        f"    spec:\n      containers:\n        - name: api\n          image: {repository}:abc123\n")
    pinned = cli("pin", str(manifest), "--env", "staging", *remote(gate, kit, "reader"))
    assert pinned.returncode == 0, pinned.stderr
    assert manifest.read_text().endswith(f"          image: {repository}@{built}\n")

    environments = tmp_path / "environments.yaml"
    environments.write_text("apiVersion: promotion-gate.io/v1\nkind: Policy\n"
                            "environments: [{name: ci}, {name: staging}, {name: production}]\n")
    manifest.write_text(manifest.read_text().replace(f"@{built}", ":abc123"))
    checked = cli("check", str(manifest), "--policy", str(environments), "--environment", "staging",
                  "--server", gate.url, "--token-file", str(kit.token_file("reader")), "--ca-file", str(gate.ca))
    assert checked.returncode == 1
    assert checked.stdout.strip() == (
        f'[mutable-tag] Deployment api spec.template.spec.containers[0] "api": image "{repository}:abc123" is a '
        f"mutable tag; the digest promoted to staging for :abc123 is {repository}@{built}  ({manifest} document 1)")
