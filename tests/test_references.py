"""The image reference grammar, as the kubelet parses a Pod's image field."""

from __future__ import annotations

import pytest

from webhook.core import references
from webhook.core.references import Pinning

H64 = "a" * 64
H128 = "b" * 128

# (image, pinning, normalised repository, tag, digest)
VALID = [
    ("busybox", Pinning.MUTABLE_TAG, "docker.io/library/busybox", None, None),
    ("busybox:1.36", Pinning.MUTABLE_TAG, "docker.io/library/busybox", "1.36", None),
    ("library/busybox", Pinning.MUTABLE_TAG, "docker.io/library/busybox", None, None),
    ("docker.io/busybox", Pinning.MUTABLE_TAG, "docker.io/library/busybox", None, None),
    ("index.docker.io/library/busybox:latest", Pinning.MUTABLE_TAG, "docker.io/library/busybox", "latest", None),
    ("acme/api:1.4", Pinning.MUTABLE_TAG, "docker.io/acme/api", "1.4", None),
    ("ghcr.io/acme/payment-api:1.4", Pinning.MUTABLE_TAG, "ghcr.io/acme/payment-api", "1.4", None),
    ("localhost/api", Pinning.MUTABLE_TAG, "localhost/api", None, None),
    ("localhost:5000/api:dev", Pinning.MUTABLE_TAG, "localhost:5000/api", "dev", None),
    ("registry.example.com:5000/team/api", Pinning.MUTABLE_TAG, "registry.example.com:5000/team/api", None, None),
    ("Registry.Example.com/api:v1", Pinning.MUTABLE_TAG, "Registry.Example.com/api", "v1", None),
    ("MyRegistry/api", Pinning.MUTABLE_TAG, "MyRegistry/api", None, None),  # uppercase first component = domain
    ("[::1]:5000/api:v1", Pinning.MUTABLE_TAG, "[::1]:5000/api", "v1", None),
    ("a/b/c/d/e:tag_with.dots-and_", Pinning.MUTABLE_TAG, "docker.io/a/b/c/d/e", "tag_with.dots-and_", None),
    ("api:" + "t" * 128, Pinning.MUTABLE_TAG, "docker.io/library/api", "t" * 128, None),
    (f"busybox@sha256:{H64}", Pinning.PINNED, "docker.io/library/busybox", None, f"sha256:{H64}"),
    (f"ghcr.io/acme/payment-api:1.4@sha256:{H64}", Pinning.PINNED, "ghcr.io/acme/payment-api", "1.4",
     f"sha256:{H64}"),
    (f"localhost:5000/api@sha512:{H128}", Pinning.PINNED, "localhost:5000/api", None, f"sha512:{H128}"),
    (f"my_repo/a__b/c--d/e.f@sha256:{H64}", Pinning.PINNED, "docker.io/my_repo/a__b/c--d/e.f", None,
     f"sha256:{H64}"),
]


@pytest.mark.parametrize(("image", "pinning", "repository", "tag", "digest"), VALID, ids=[v[0][:60] for v in VALID])
def test_valid_references(image: str, pinning: Pinning, repository: str, tag: str | None, digest: str | None) -> None:
    result = references.classify(image)
    assert result.pinning is pinning, result.problem
    assert result.reference is not None
    assert result.reference.repository == repository
    assert result.reference.tag == tag
    assert result.reference.digest == digest


# (image, the exact problem a developer reads)
INVALID = [
    ("", "image is empty"),
    (" busybox", "image has leading or trailing whitespace"),
    ("busybox\n", "image has leading or trailing whitespace"),
    ("bus box", "repository name is not valid (lowercase letters, digits and separators \".\", \"_\", \"-\" between them)"),
    ("bùsybox", "image contains non-ASCII characters"),
    ("ghcr.io/acme/Payment-API:1.4", "repository name must be lowercase"),
    ("acme/API", "repository name must be lowercase"),
    (H64, "image is a bare 64-character hex identifier, not a repository name"),
    ("busybox:", 'tag "" is not valid (letters, digits, "_", "." and "-"; must not start with "." or "-")'),
    ("busybox:.hidden", 'tag ".hidden" is not valid (letters, digits, "_", "." and "-"; must not start with "." or "-")'),
    ("api:" + "t" * 129, "tag is longer than 128 characters"),
    ("busybox@sha256:abc", "sha256 digest must be exactly 64 lowercase hex characters (got 3)"),
    (f"busybox@sha256:{H64[:-1]}", "sha256 digest must be exactly 64 lowercase hex characters (got 63)"),
    (f"busybox@sha256:{H64}0", "sha256 digest must be exactly 64 lowercase hex characters (got 65)"),
    (f"busybox@sha256:{'A' * 64}", "sha256 digest must be exactly 64 lowercase hex characters (got 64, with uppercase)"),
    (f"busybox@sha512:{H64}", "sha512 digest must be exactly 128 lowercase hex characters (got 64)"),
    (f"busybox@sha384:{'c' * 96}", 'digest algorithm "sha384" is not supported; pin with sha256 (64 lowercase hex characters)'),
    (f"busybox@md5:{'c' * 32}", 'digest algorithm "md5" is not supported; pin with sha256 (64 lowercase hex characters)'),
    ("busybox@latest", '"@latest" is not a digest (expected sha256:<64 lowercase hex characters>)'),
    ("busybox@", '"@" is not a digest (expected sha256:<64 lowercase hex characters>)'),
    ("ghcr.io//api", "repository name has an empty path component"),
    ("ghcr.io/api/", "repository name has an empty path component"),
    (":1.4", "image has no repository name"),
    ("-api", "repository name is not valid (lowercase letters, digits and separators \".\", \"_\", \"-\" between them)"),
    ("ghcr.io/" + "a" * 248, "repository name is longer than 255 characters"),
    ("a" * 5000, "image is longer than 4096 characters"),
]


@pytest.mark.parametrize(("image", "problem"), INVALID, ids=[i[0][:40] or "empty" for i in INVALID])
def test_invalid_references(image: str, problem: str) -> None:
    result = references.classify(image)
    assert result.pinning is Pinning.INVALID
    assert result.problem == problem


def test_name_length_counts_the_normalised_domain() -> None:
    # 'docker.io/library/' is added before the 255-character limit applies, as in distribution.
    longest = "a" * (255 - len("docker.io/library/"))
    assert references.classify(longest).pinning is Pinning.MUTABLE_TAG
    assert references.classify(longest + "a").problem == "repository name is longer than 255 characters"


def test_pinned_form_keeps_the_written_name() -> None:
    ref = references.parse(f"nginx:1.25@sha256:{H64}")
    assert ref.pinned_form == f"nginx@sha256:{H64}"
    assert ref.canonical == f"docker.io/library/nginx@sha256:{H64}"


@pytest.mark.parametrize("text", [f"sha256:{H64}", f"sha512:{H128}"])
def test_is_digest_accepts_registered_digests(text: str) -> None:
    assert references.is_digest(text)


@pytest.mark.parametrize("text", [f"sha256:{H64.upper()}", "sha256:abc", f"sha1:{H64}", f"{H64}", "",
                                  f"sha256:{H64}\n", f"\nsha256:{H64}", f"sha512:{H128}\n"])
def test_is_digest_rejects_everything_else(text: str) -> None:
    assert not references.is_digest(text)
