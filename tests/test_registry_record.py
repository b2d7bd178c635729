"""``record`` reads the image from a real registry: tags resolved, indexes walked, labels checked.

The registry is Debian's distribution registry on loopback (TLS, htpasswd or token auth), holding
images the tests built and pushed with skopeo (``tests/conftest.py::images``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import COMMIT, Images
from tools.oci_images import Layout, push
from tools.promotion_kit import Kit, cli, make_kit, policy_document
from tools.registries import docker_config, registry_server
from tools.servers import free_port

EVIDENCE = ["--tests-passed", "3", "--tests-failed", "0", "--scan-critical", "0", "--scan-high", "0"]
CONFIRMED = "source confirmed by the image's labels: git commit, CI run, source repository"


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


def logged_in(images: Images, tmp_path: Path, password: str = "correct-horse") -> Path:
    return docker_config(tmp_path / "docker", {images.registry.host: ("ci-bot", password)})


def record(images: Images, kit: Kit, tmp_path: Path, image: str, *flags: str, config: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    config_flags = [] if env else ["--docker-config", str(config or logged_in(images, tmp_path))]
    return cli("record", image, "--env", "ci", *EVIDENCE, "--key", str(kit.key("ci")), "--by", "ci-bot",
               "--registry-ca-file", str(images.registry.ca), *config_flags, *flags,
               "--store", f"sqlite:///{tmp_path / 'store.db'}", "--policy", str(kit.policy_path), env=env)


def history(kit: Kit, tmp_path: Path, repository: str) -> list[dict]:  # type: ignore[type-arg]
    found = cli("history", repository, "--output", "json", "--store", f"sqlite:///{tmp_path / 'store.db'}",
                "--policy", str(kit.policy_path))
    assert found.returncode == 0, found.stderr
    return json.loads(found.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("tag", "shape"), [
    ("abc123", "an index of 2 image(s): linux/amd64, linux/arm64"),
    ("single", "one image: linux/amd64"),
])
def test_a_tag_is_resolved_and_the_record_says_what_it_was_built_as(images: Images, kit: Kit, tmp_path: Path,
                                                                    tag: str, shape: str) -> None:
    repository, digest = f"{images.registry.host}/acme/payment-api", images.digests[tag]
    result = record(images, kit, tmp_path, images.ref(tag))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{repository}@{digest} recorded for ci: record ")
    assert result.stderr.splitlines() == [f"{images.ref(tag)} is {repository}@{digest} ({shape})", CONFIRMED]
    (stored,) = history(kit, tmp_path, repository)
    assert (stored["digest"], stored["builtAs"]) == (digest, tag)
    assert stored["source"] == {"gitCommit": COMMIT, "repository": "https://github.com/acme/payment-api",
                                "ciRunId": "8812345", "ciRunUrl": ""}
    assert stored["confirmedByImageLabels"] == ["ciRunId", "gitCommit", "repository"]


def test_by_digest_the_image_is_read_and_no_tag_is_claimed(images: Images, kit: Kit, tmp_path: Path) -> None:
    repository, digest = f"{images.registry.host}/acme/payment-api", images.digests["abc123"]
    result = record(images, kit, tmp_path, f"{repository}@{digest}", "--git-commit", COMMIT, "--ci-run", "8812345")
    assert result.returncode == 0, result.stderr
    (stored,) = history(kit, tmp_path, repository)
    assert (stored["builtAs"], stored["confirmedByImageLabels"]) == (None, ["ciRunId", "gitCommit", "repository"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--git-commit", "deadbeef"],
     '--git-commit "deadbeef" contradicts the image: its label org.opencontainers.image.revision is '
     f'"{COMMIT}"'),
    (["--ci-run", "1"], '--ci-run "1" contradicts the image: its label ci.run is "8812345"'),
    (["--git-repository", "https://github.com/evil/payment-api"],
     '--git-repository "https://github.com/evil/payment-api" contradicts the image: its label '
     'org.opencontainers.image.source is "https://github.com/acme/payment-api"'),
])
def test_a_flag_that_contradicts_the_image_is_refused_and_nothing_is_recorded(
        images: Images, kit: Kit, tmp_path: Path, flags: list[str], message: str) -> None:
    repository, digest = f"{images.registry.host}/acme/payment-api", images.digests["abc123"]
    result = record(images, kit, tmp_path, images.ref("abc123"), *flags)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: {message} ({repository}@{digest}); nothing was recorded"
    assert history(kit, tmp_path, repository) == []


def test_a_matching_flag_confirms_and_an_abbreviation_is_a_contradiction(images: Images, kit: Kit,
                                                                         tmp_path: Path) -> None:
    same = record(images, kit, tmp_path, images.ref("abc123"), "--git-commit", COMMIT.upper(), "--git-repository",
                  "https://github.com/acme/payment-api.git", "--ci-run-url", "https://ci.example/runs/8812345")
    assert same.returncode == 0, same.stderr
    assert same.stderr.splitlines()[-1] == CONFIRMED
    short = record(images, kit, tmp_path, images.ref("single"), "--git-commit", COMMIT[:7])
    assert short.returncode == 1


def test_an_image_without_labels_confirms_nothing(images: Images, kit: Kit, tmp_path: Path) -> None:
    repository, digest = f"{images.registry.host}/acme/payment-api", images.digests["unlabelled"]
    result = record(images, kit, tmp_path, images.ref("unlabelled"), "--git-commit", "4f2c9e1", "--ci-run", "77")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"{images.ref('unlabelled')} is {repository}@{digest} (one image: linux/amd64)",
        "note: the git commit is not confirmed: the image has no org.opencontainers.image.revision or git.commit "
        "label",
        "note: the CI run is not confirmed: the image has no ci.run label",
        "note: the source repository is not confirmed: the image has no org.opencontainers.image.source label"]
    (stored,) = history(kit, tmp_path, repository)
    assert (stored["source"]["gitCommit"], stored["confirmedByImageLabels"]) == ("4f2c9e1", [])
    trace = cli("trace", digest, "--store", f"sqlite:///{tmp_path / 'store.db'}", "--policy", str(kit.policy_path))
    assert "      not confirmed by image labels\n" in trace.stdout


def test_the_policy_can_require_the_source_confirmed_by_the_image(images: Images, tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    document = policy_document(kit.root)
    document["environments"][0]["evidence"]["requireImageLabels"] = True  # type: ignore[index]
    kit.policy_path.write_text(yaml.safe_dump(document))
    refused = record(images, kit, tmp_path, images.ref("unlabelled"), "--git-commit", "4f2c9e1", "--ci-run", "77")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        'error: 422: rule evidence.requireImageLabels: "ci" requires the git commit and the CI run confirmed by the '
        "image's own labels; not confirmed: git commit, CI run. Build with --label git.commit=… --label ci.run=… and "
        "record the image from its registry (promotion-gate record REPO:TAG)")
    assert record(images, kit, tmp_path, images.ref("abc123")).returncode == 0


def test_platforms_that_disagree_are_refused_and_a_half_labelled_index_confirms_less(
        images: Images, kit: Kit, tmp_path: Path) -> None:
    split = record(images, kit, tmp_path, images.ref("split"))
    assert split.returncode == 1
    assert split.stderr.splitlines()[-1] == (
        f"error: the platforms of {images.registry.host}/acme/payment-api@{images.digests['split']} disagree on the "
        f'git commit: linux/amd64 has "1111111", linux/arm64 has "{COMMIT}"; nothing was recorded')
    half = record(images, kit, tmp_path, images.ref("half"), "--git-commit", COMMIT, "--ci-run", "8812345")
    assert half.returncode == 0, half.stderr
    assert "note: the git commit is not confirmed: org.opencontainers.image.revision is missing on linux/arm64" in (
        half.stderr.splitlines())


def test_a_tag_that_moved_away_from_the_given_digest_is_refused(images: Images, kit: Kit, tmp_path: Path) -> None:
    repository = f"{images.registry.host}/acme/payment-api"
    result = record(images, kit, tmp_path, f"{repository}:single@{images.digests['abc123']}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {repository}:single now points to {images.digests['single']}, not to {images.digests['abc123']}; "
        "the tag was pushed again since that build; nothing was recorded")


def test_credentials_are_required_and_checked(images: Images, kit: Kit, tmp_path: Path) -> None:
    host = images.registry.host
    anonymous = docker_config(tmp_path / "anonymous")
    missing = record(images, kit, tmp_path, images.ref("abc123"), config=anonymous)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"error: registry {host} requires authentication for {images.ref('abc123')}: log in with 'docker login "
        f"{host}' (credentials are read from {anonymous}/config.json) (UNAUTHORIZED: authentication required); "
        "nothing was recorded")
    wrong = record(images, kit, tmp_path, images.ref("abc123"), config=logged_in(images, tmp_path, "wrong"))
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f'error: registry {host} refused the credentials of "ci-bot" (from {tmp_path}/docker/config.json) for '
        f"{images.ref('abc123')} (UNAUTHORIZED: authentication required); nothing was recorded")
    assert history(kit, tmp_path, f"{host}/acme/payment-api") == []


def test_a_credential_helper_is_asked_and_a_missing_one_is_named(images: Images, kit: Kit, tmp_path: Path) -> None:
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper = helpers / "docker-credential-vault"
    helper.write_text('#!/bin/sh\nread server\n[ "$1" = get ] && printf \'{"ServerURL":"%s","Username":"ci-bot",'
                      '"Secret":"correct-horse"}\' "$server"\n')
    helper.chmod(0o755)
    config = docker_config(tmp_path / "helped", credHelpers={images.registry.host: "vault"})
    path = f"{helpers}:/usr/bin:/bin"
    asked = record(images, kit, tmp_path, images.ref("abc123"), "--docker-config", str(config), env={"PATH": path})
    assert asked.returncode == 0, asked.stderr
    store = docker_config(tmp_path / "store", credsStore="osxkeychain")
    absent = record(images, kit, tmp_path, images.ref("abc123"), config=store)
    assert absent.returncode == 2
    assert absent.stderr.strip() == (
        f"error: {store}/config.json: credsStore names the credential helper docker-credential-osxkeychain, which is "
        "not installed (not on PATH); nothing was recorded")


def test_an_unreachable_registry_exits_3_and_records_nothing(images: Images, kit: Kit, tmp_path: Path) -> None:
    port = free_port()
    down = record(images, kit, tmp_path, f"127.0.0.1:{port}/acme/payment-api:abc123")
    assert down.returncode == 3
    assert down.stderr.strip() == (f"error: cannot reach registry 127.0.0.1:{port}: connection refused; nothing was "
                                   "recorded")
    assert history(kit, tmp_path, f"127.0.0.1:{port}/acme/payment-api") == []


def test_tls_is_verified_unless_the_registry_is_on_this_machine_and_insecure_is_asked(
        images: Images, kit: Kit, tmp_path: Path) -> None:
    unverified = cli("record", images.ref("abc123"), "--env", "ci", *EVIDENCE, "--key", str(kit.key("ci")),
                     "--docker-config", str(logged_in(images, tmp_path)), "--store", f"sqlite:///{tmp_path / 's.db'}",
                     "--policy", str(kit.policy_path))
    assert unverified.returncode == 3
    assert unverified.stderr.startswith(f"error: cannot reach registry {images.registry.host}: TLS verification "
                                        "failed (")
    assert unverified.stderr.strip().endswith("for a private CA give --registry-ca-file; nothing was recorded")
    remote = record(images, kit, tmp_path, "registry.example.com/acme/payment-api:abc123", "--insecure-registry")
    assert remote.returncode == 2
    assert remote.stderr.strip() == (
        "error: --insecure-registry is only for a registry on this machine (localhost, 127.0.0.1, ::1); "
        "registry.example.com must be reached over verified TLS: give its CA with --registry-ca-file; nothing was "
        "recorded")


def test_a_plain_http_registry_on_loopback_with_insecure(tmp_path: Path, kit: Kit) -> None:
    with registry_server(tmp_path / "plain", tls=False, auth=None) as plain:
        layout = Layout(tmp_path / "layout")
        layout.tag("v1", layout.image({"git.commit": "4f2c9e1", "ci.run": "9"}))
        digest = push(layout, "v1", f"{plain.host}/acme/plain:v1", insecure=True)
        result = cli("record", f"{plain.host}/acme/plain:v1", "--insecure-registry", "--env", "ci", *EVIDENCE,
                     "--key", str(kit.key("ci")), "--docker-config", str(docker_config(tmp_path / "docker")),
                     "--store", f"sqlite:///{tmp_path / 's.db'}", "--policy", str(kit.policy_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{plain.host}/acme/plain@{digest} recorded for ci")


def test_bearer_token_challenges_as_ghcr_and_docker_hub_answer(tmp_path: Path, kit: Kit) -> None:
    """The registry sends ``WWW-Authenticate: Bearer realm=…``; credentials come from $DOCKER_CONFIG."""
    with registry_server(tmp_path / "token", auth="token", users={"ci-bot": "s3cret"}) as registry:
        layout = Layout(tmp_path / "layout")
        layout.tag("abc123", layout.image({"git.commit": "4f2c9e1", "ci.run": "9"}))
        digest = push(layout, "abc123", f"{registry.host}/acme/api:abc123", cert_dir=registry.cert_dir,
                      credentials=("ci-bot", "s3cret"))

        def run(password: str | None) -> subprocess.CompletedProcess[str]:
            directory = tmp_path / f"docker-{password}"
            docker_config(directory, {registry.host: ("ci-bot", password)} if password else {})
            return cli("record", f"{registry.host}/acme/api:abc123", "--env", "ci", *EVIDENCE, "--key",
                       str(kit.key("ci")), "--registry-ca-file", str(registry.ca), "--store",
                       f"sqlite:///{tmp_path / 's.db'}", "--policy", str(kit.policy_path),
                       env={"DOCKER_CONFIG": str(directory)})

        good, wrong, anonymous = run("s3cret"), run("guess"), run(None)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"{registry.host}/acme/api@{digest} recorded for ci")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f'error: registry {registry.host} refused the credentials of "ci-bot" (from {tmp_path}/docker-guess/'
        f"config.json) for {registry.host}/acme/api: its token service answered 401; nothing was recorded")
    assert anonymous.returncode == 1
    assert anonymous.stderr.strip().startswith(f"error: registry {registry.host} requires authentication")
