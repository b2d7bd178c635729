"""A registry that is broken or lies: every answer we refuse is a clear error, exit 3, nothing recorded.

The registry here is a small HTTP server on loopback that answers what each case needs (plain HTTP,
so ``--insecure-registry``); the parsing it exercises is :mod:`webhook.core.image_manifests`, whose
tables follow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tools.promotion_kit import Kit, cli, make_kit
from tools.registries import Answer, HostileRegistry, docker_config, endless, send
from webhook.core import image_labels, image_manifests
from webhook.core.image_labels import PlatformLabels
from webhook.core.records import Source

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"ci.run": "1"}}}).encode()
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()


def manifest(config_size: int = len(CONFIG), config_digest: str = CONFIG_DIGEST) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": [], "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
        "size": config_size}}).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def answer(body: bytes, content_type: str = MANIFEST, headers: dict[str, str] | None = None,
           status: int = 200) -> Answer:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        send(handler, status, body, {"Content-Type": content_type, **(headers or {})})
    return respond


def redirect(to: str) -> Answer:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(307)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return respond


TAG = "/v2/acme/api/manifests/v1"
BLOB = f"/v2/acme/api/blobs/{CONFIG_DIGEST}"
OTHER = "sha256:" + "e" * 64
INDEX_BODY = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
    {"mediaType": MANIFEST, "digest": OTHER, "size": 100, "platform": {"os": "linux", "architecture": "amd64"}}]})

REFUSES = "registry HOST answered with content this command refuses: "
# name: (routes, the message after "error: ", HOST standing for the registry)
CASES: dict[str, tuple[dict[str, Answer], str]] = {
    "a manifest that announces 100 MiB": (
        {TAG: answer(b"{}", headers={"Content-Length": str(100 * 1024 * 1024)})},
        "HOST/acme/api:v1: the registry announced 104857600 bytes, more than the 4194304 this command reads"),
    "a manifest that never ends": ({TAG: endless}, "HOST/acme/api:v1: the registry sent more than 4194304 bytes"),
    "a manifest that is not JSON": ({TAG: answer(b"<html>login</html>")},
                                    REFUSES + "HOST/acme/api:v1 is not JSON"),
    "a header that lies about the digest": (
        {TAG: answer(manifest(), headers={"Docker-Content-Digest": OTHER})},
        REFUSES + f"HOST/acme/api:v1: the registry says the manifest is {OTHER}, but the bytes it sent hash to "
        f"{digest(manifest())}"),
    "a config that is not what the manifest names": (
        {TAG: answer(manifest()), BLOB: answer(CONFIG.replace(b"1", b"2"), "application/octet-stream")},
        REFUSES + f"the config of HOST/acme/api:v1: the registry sent content whose digest is "
        f"{digest(CONFIG.replace(b'1', b'2'))}, not {CONFIG_DIGEST}"),
    "an index entry served with other bytes": (
        {TAG: answer(INDEX_BODY.encode(), INDEX), f"/v2/acme/api/manifests/{OTHER}": answer(manifest())},
        REFUSES + f"HOST/acme/api@{OTHER} (linux/amd64): the registry sent content whose digest is "
        f"{digest(manifest())}, not {OTHER}"),
    "a config announced as 1 GiB": (
        {TAG: answer(manifest(config_size=1 << 30))},
        REFUSES + "HOST/acme/api:v1 config is 1073741824 bytes, more than the 8388608 this command reads"),
    "an index of 40 platforms": (
        {TAG: answer(json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
            {"mediaType": MANIFEST, "digest": f"sha256:{n:064x}", "size": 10,
             "platform": {"os": "linux", "architecture": f"arch{n}"}} for n in range(40)]}).encode(), INDEX)},
        REFUSES + "HOST/acme/api:v1 names more than 16 images; this command reads at most 16 platforms"),
    "a redirect loop": ({TAG: redirect(TAG)}, "registry HOST redirected more than 5 times (a redirect loop?)"),
    "a token realm on plain HTTP elsewhere": (
        {TAG: answer(b"{}", status=401, headers={
            "WWW-Authenticate": 'Bearer realm="http://auth.example.com/token",service="r"'})},
        "registry HOST asked for a token over plain HTTP from auth.example.com; credentials are only sent over TLS"),
    "a server error": ({TAG: answer(b'{"errors":[{"code":"UNKNOWN","message":"disk full"}]}', status=500)},
                       "registry HOST answered 500 for HOST/acme/api:v1 (UNKNOWN: disk full)"),
}


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    registry = HostileRegistry({})
    yield registry
    registry.stop()


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_registry_is_refused_with_a_clear_error(hostile: HostileRegistry, kit: Kit, tmp_path: Path,
                                                          name: str) -> None:
    routes, message = CASES[name]
    hostile.routes.update(routes)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    result = cli("record", f"{hostile.host}/acme/api:v1", "--insecure-registry", "--env", "ci", "--git-commit", "c",
                 "--ci-run", "1", "--tests-passed", "1", "--tests-failed", "0", "--scan-critical", "0",
                 "--scan-high", "0", "--key", str(kit.key("ci")), "--docker-config",
                 str(docker_config(tmp_path / "docker")), "--store", store, "--policy", str(kit.policy_path))
    assert result.returncode == 3, result.stderr
    expected = message.replace("HOST", hostile.host)
    if expected.startswith(REFUSES + ""):
        expected = f"registry {hostile.host} answered with content this command refuses: {expected[9:]}"
    elif not expected.startswith("registry") and not expected.startswith("cannot"):
        expected = f"registry {hostile.host} answered with content this command refuses: {expected}" \
            if "bytes" not in expected else expected
    assert result.stderr.strip() == f"error: {expected}; nothing was recorded"
    history = cli("history", f"{hostile.host}/acme/api", "--store", store, "--policy", str(kit.policy_path))
    assert history.stdout == f"no records for {hostile.host}/acme/api\n"


# --- manifests, indexes and configs as bytes (no network) ----------------------------------------------

@pytest.mark.parametrize(("data", "content_type", "problem"), [
    (b"[]", MANIFEST, "m must be an object"),
    (json.dumps({"schemaVersion": 1, "name": "x"}).encode(), "application/vnd.docker.distribution.manifest.v1+json",
     "m is not a schema 2 manifest (Docker schema 1 images are not supported)"),
    (json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}).encode(), INDEX, "m names no image"),
    (json.dumps({"schemaVersion": 2, "mediaType": MANIFEST}).encode(), INDEX,
     f"m says it is {MANIFEST} but was served as {INDEX}"),
    (json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {
        "mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": CONFIG_DIGEST, "size": 1}}).encode(),
     MANIFEST, "m is not a container image: its config is application/vnd.cncf.helm.config.v1+json"),
    (json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": INDEX, "digest": OTHER, "size": 1}]}).encode(), INDEX,
     "m manifests[0] is an index inside an index; nested indexes are not supported"),
    (json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": "sha256:XYZ", "size": 1}]}).encode(), INDEX,
     "m manifests[0].digest 'sha256:XYZ' is not sha256:<64 hex> or sha512:<128 hex>"),
])
def test_what_is_not_an_image_is_named(data: bytes, content_type: str, problem: str) -> None:
    with pytest.raises(image_manifests.ManifestError) as refused:
        image_manifests.parse_manifest(data, content_type, "m")
    assert str(refused.value) == problem


def test_attestations_in_an_index_are_not_platforms() -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": OTHER, "size": 10, "platform": {"os": "linux", "architecture": "arm64",
                                                                         "variant": "v8"}},
        {"mediaType": MANIFEST, "digest": "sha256:" + "f" * 64, "size": 10,
         "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]}).encode()
    parsed = image_manifests.parse_manifest(index, INDEX, "m")
    assert isinstance(parsed, image_manifests.ImageIndex)
    assert [(i.digest, i.platform) for i in parsed.images] == [(OTHER, "linux/arm64/v8")]


@pytest.mark.parametrize(("labels", "problem"), [
    ({"git.commit": "a", "org.opencontainers.image.revision": "b"},
     'the labels of linux/amd64 disagree: org.opencontainers.image.revision is "b" but git.commit is "a"'),
    ({"ci.run": "1\n[mutable-tag] forged"}, "label ci.run of linux/amd64 holds control characters"),
    ({"ci.run": "x" * 5000}, "label ci.run of linux/amd64 is longer than 4096 characters"),
])
def test_labels_a_record_must_not_carry_are_refused(labels: dict[str, str], problem: str) -> None:
    with pytest.raises(image_labels.LabelConflict) as refused:
        image_labels.reconcile(Source(), [PlatformLabels("linux/amd64", labels)], "r@d")
    assert str(refused.value) == problem


def test_a_docker_manifest_list_reads_like_an_oci_index() -> None:
    """What `docker buildx build --push` writes for several platforms: Docker's media types, same meaning."""
    listed = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
                         "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                        "digest": OTHER, "size": 528,
                                        "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    parsed = image_manifests.parse_manifest(listed, "application/vnd.docker.distribution.manifest.list.v2+json", "m")
    assert isinstance(parsed, image_manifests.ImageIndex)
    assert [(i.media_type, i.platform) for i in parsed.images] == [
        ("application/vnd.docker.distribution.manifest.v2+json", "linux/amd64")]
    single = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                         "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                    "digest": CONFIG_DIGEST, "size": len(CONFIG)}, "layers": []}).encode()
    image = image_manifests.parse_manifest(single, "application/vnd.docker.distribution.manifest.v2+json", "m")
    assert isinstance(image, image_manifests.ImageManifest) and image.config.digest == CONFIG_DIGEST
