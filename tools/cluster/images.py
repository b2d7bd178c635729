"""The images the single-node cluster runs, made on this machine from Debian packages and the repo.

* ``pause``: a static C binary (gcc -static), one layer. containerd's sandbox image.
* ``app``: busybox-static in one layer, with the OCI labels ``git.commit`` and ``ci.run``; a new one
  (a new digest) per test run, the image CI "built once".
* ``base``: Debian bookworm with Python 3.11 and venv, made by mmdebstrap: the project image's base
  when no registry can be reached (the Dockerfile's ``PYTHON_IMAGE`` build argument picks it).
* ``promotion-gate``: the project image, built from the project's Dockerfile by ``buildah bud``.

Every archive is cached under ``<cache>/images/`` by a hash of its inputs and rebuilt only when they
change. Nothing is downloaded except Debian packages (mmdebstrap) and Python packages (pip, in the
Dockerfile's builder stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.cluster import config, oci

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd", "ca-certificates")
# Bump to rebuild every cached image made by this module.
RECIPE_VERSION = "1"

PAUSE_C = r"""
/* The sandbox ("pause") container: hold the Pod's namespaces, reap children, exit on a signal. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction stop = {0}, child = {0};
    stop.sa_handler = quit;
    child.sa_handler = reap;
    child.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGCHLD, &child, NULL);
    for (;;) pause();
    return 0;
}
"""

# The per-run application: a shell loop that exits at once on SIGTERM (sleep as PID 1 would not).
APP_COMMAND = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while true; do sleep 1; done"]


@dataclass(frozen=True)
class BuiltImage:
    name: str  # the name inside the archive (repository:tag)
    archive: Path
    digest: str
    seconds: float  # build time; 0 when it came from the cache
    cached: bool


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(args: Sequence[str | Path], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
        quiet: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    command = [str(a) for a in args]
    result = subprocess.run(command, capture_output=quiet, text=True, env=dict(env) if env is not None else None,
                            cwd=cwd, timeout=timeout)
    if result.returncode != 0:
        output = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if quiet else ""
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{output}")
    return result


def _hash(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def tree_hash(root: Path, paths: Iterable[str]) -> str:
    """Content hash of files and directory trees under ``root`` (names and bytes; caches ignored)."""
    digest = hashlib.sha256()
    for relative in sorted(paths):
        path = root / relative
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix in (".pyc", ".pyo"):
                continue
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _cached(archive: Path, name: str) -> BuiltImage | None:
    if archive.is_file():
        return BuiltImage(name, archive, oci.archive_digest(archive), 0.0, True)
    return None


# --- pause ------------------------------------------------------------------------------------------


def pause_image() -> BuiltImage:
    gcc = shutil.which("gcc") or "gcc"
    version = run([gcc, "--version"]).stdout.splitlines()[0]
    key = _hash(RECIPE_VERSION, PAUSE_C, version)[:16]
    name = config.PAUSE_IMAGE
    archive = config.image_cache() / f"pause-{key}.oci.tar"
    if (hit := _cached(archive, name)) is not None:
        return hit
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pause-") as tmp:
        source, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
        source.write_text(PAUSE_C)
        run([gcc, "-static", "-Os", "-s", "-o", binary, source])
        layer = oci.layer_from_entries([oci.Entry("pause", binary.read_bytes(), 0o755)])
    built = oci.write_archive(archive, name, layer, oci.ImageConfig(entrypoint=["/pause"], user="65535:65535"))
    log(f"pause image {built.digest} ({built.size} bytes) in {time.monotonic() - started:.1f}s")
    return BuiltImage(name, archive, built.digest, time.monotonic() - started, False)


# --- the per-run application image --------------------------------------------------------------


def app_image(directory: Path, *, repository: str, git_commit: str, ci_run: str) -> BuiltImage:
    """busybox in one layer, labelled like a CI build; a new digest for every ``ci_run``."""
    started = time.monotonic()
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise RuntimeError("/bin/busybox not found: install the Debian package busybox-static")
    check = subprocess.run(["file", "-b", str(busybox)], capture_output=True, text=True)
    if check.returncode == 0 and "dynamically linked" in check.stdout:
        raise RuntimeError("/bin/busybox is dynamically linked: install busybox-static, not busybox")
    entries = [
        oci.Entry("bin", None, 0o755),
        oci.Entry("bin/busybox", busybox.read_bytes(), 0o755),
        oci.Entry("tmp", None, 0o1777),
        oci.Entry("etc", None, 0o755),
        oci.Entry("etc/passwd", b"root:x:0:0:root:/:/bin/sh\napp:x:65532:65532:app:/tmp:/bin/sh\n", 0o644),
        oci.Entry("etc/group", b"root:x:0:\napp:x:65532:\n", 0o644),
        oci.Entry("etc/build-info", f"git.commit={git_commit}\nci.run={ci_run}\n".encode(), 0o644),
    ]
    entries += [oci.Entry(f"bin/{tool}", link="busybox") for tool in ("sh", "sleep", "cat", "echo", "nc", "ls")]
    labels = {"git.commit": git_commit, "ci.run": ci_run, "org.opencontainers.image.revision": git_commit}
    tag = f"run-{ci_run}"
    name = f"{repository}:{tag}"
    built = oci.write_archive(directory / f"app-{ci_run}.oci.tar", name, oci.layer_from_entries(entries),
                              oci.ImageConfig(cmd=APP_COMMAND, user="65532:65532", labels=labels))
    return BuiltImage(name, built.path, built.digest, time.monotonic() - started, False)


# --- the Debian base and the project image ------------------------------------------------------


def debian_sources(mirror: str | None = None, security: str | None = None) -> list[str]:
    mirror = mirror or os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    security = security or os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
    return [f"deb {mirror} {BASE_SUITE} main", f"deb {mirror} {BASE_SUITE}-updates main",
            f"deb {security} {BASE_SUITE}-security main"]


def base_image() -> BuiltImage:
    """Debian bookworm + python3.11 + venv, as an OCI archive (mmdebstrap; no registry involved)."""
    sources = debian_sources()
    key = _hash(RECIPE_VERSION, BASE_SUITE, *BASE_PACKAGES, *sources)[:16]
    name = f"localhost/promotion-gate-base:{BASE_SUITE}-{key}"
    archive = config.image_cache() / f"base-{BASE_SUITE}-{key}.oci.tar"
    if (hit := _cached(archive, name)) is not None:
        return hit
    started = time.monotonic()
    log(f"building the Debian {BASE_SUITE} base image with mmdebstrap ({', '.join(BASE_PACKAGES)})")
    with tempfile.TemporaryDirectory(prefix="base-", dir=config.image_cache()) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        excludes = ["path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                    "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*"]
        args: list[str | Path] = [
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet",
            "--include=" + ",".join(BASE_PACKAGES),
            "--aptopt=Acquire::Check-Valid-Until \"false\"",
            *[f"--dpkgopt={option}" for option in excludes],
            # No apt lists or caches in the image; no host pip settings leak in (nothing runs pip here).
            "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/* \"$1\"/var/log/*",
            BASE_SUITE, rootfs, *sources,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["SOURCE_DATE_EPOCH"] = "0"
        run(args, env=env, timeout=1800)
        layer = rootfs.read_bytes()
    image_config = oci.ImageConfig(cmd=["python3"], env=[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"])
    built = oci.write_archive(archive, name, layer, image_config)
    seconds = time.monotonic() - started
    log(f"base image {name} {built.digest} ({built.size // 1_000_000} MB compressed) in {seconds:.0f}s")
    return BuiltImage(name, archive, built.digest, seconds, False)


PROJECT_INPUTS = ("pyproject.toml", "README.md", "webhook", "Dockerfile", ".dockerignore")


def buildah_args(root: Path) -> list[str]:
    """buildah with its storage in the cache, not /var/lib/containers."""
    return ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "overlay"]


def project_image(source: Path = config.REPO, *, revision: str = "unknown",
                  python_image: str | None = None) -> BuiltImage:
    """The project's Dockerfile built with ``buildah bud``, as an OCI archive cached by its inputs.

    ``python_image``: the Dockerfile's PYTHON_IMAGE. Default: the Debian base from ``base_image()``,
    because the usual ``python:3.11-slim-bookworm`` lives on a registry this machine cannot reach.
    """
    base: BuiltImage | None = None
    if python_image is None:
        base = base_image()
        python_image = base.name
    key = _hash(RECIPE_VERSION, tree_hash(source, [p for p in PROJECT_INPUTS if (source / p).exists()]),
                python_image, base.digest if base else "")[:16]
    name = f"localhost/promotion-gate:{key}"
    archive = config.image_cache() / f"promotion-gate-{key}.oci.tar"
    if (hit := _cached(archive, name)) is not None:
        return hit
    started = time.monotonic()
    root = config.cache_root() / "buildah"
    buildah = buildah_args(root)
    if base is not None:
        run([*buildah, "pull", "--quiet", f"oci-archive:{base.archive}"])
        # The archive names the image; make sure it answers to the name the build asks for.
        run([*buildah, "tag", _pulled_id(buildah, base.digest), base.name])
    ca_bundle = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
                     or "/etc/ssl/certs/ca-certificates.crt")
    args: list[str | Path] = [
        *buildah, "bud", "--isolation", "chroot", "--network", "host", "--pull=false", "--layers=false",
        "--format", "oci", "--jobs", "1",
        "--build-arg", f"PYTHON_IMAGE={python_image}",
        "--build-arg", f"REVISION={revision}",
        "--build-arg", f"CREATED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "--build-arg", f"CI_RUN_ID={os.environ.get('CI_RUN_ID', 'local')}",
        "-t", name, "-f", source / "Dockerfile",
    ]
    if ca_bundle.is_file():
        # pip in the builder stage may need this machine's CA bundle (a TLS-intercepting proxy in
        # front of PyPI). A build secret: mounted for that one RUN, never stored in a layer.
        args += ["--secret", f"id=pip-ca,src={ca_bundle}"]
    log(f"building {name} from {source / 'Dockerfile'} with buildah (base {python_image})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    run([*args, source], env=env, timeout=3600)  # on failure the error carries the tail of the output
    tmp = archive.with_name(archive.name + ".tmp")
    tmp.unlink(missing_ok=True)
    run([*buildah, "push", "--quiet", name, f"oci-archive:{tmp}:{name}"])
    tmp.replace(archive)
    run([*buildah, "rmi", name])
    # One project image in the cache: older archives (older inputs) would only pile up.
    for old in config.image_cache().glob("promotion-gate-*.oci.tar"):
        if old != archive:
            old.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    digest = oci.archive_digest(archive)
    log(f"project image {name} {digest} in {seconds:.0f}s")
    return BuiltImage(name, archive, digest, seconds, False)


def _pulled_id(buildah: list[str], manifest_digest: str) -> str:
    images = json.loads(run([*buildah, "images", "--json", "--digests"]).stdout or "[]")
    for image in images:
        if image.get("digest") == manifest_digest or manifest_digest in image.get("digests", []):
            return str(image["id"])
    raise RuntimeError(f"buildah did not list the pulled base image {manifest_digest}")


# --- the local registry -------------------------------------------------------------------------


def push(image: BuiltImage, reference: str) -> str:
    """Copy an archive to the local registry; the pushed manifest digest (what Pods reference)."""
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        digest_file = Path(tmp) / "digest"
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", digest_file,
             f"oci-archive:{image.archive.resolve()}", f"docker://{reference}"])
        digest = digest_file.read_text().strip()
    if digest != image.digest:
        raise RuntimeError(f"pushed {reference} as {digest}, but the archive's manifest is {image.digest}")
    return digest


def image_size(image: BuiltImage) -> int:
    """Compressed bytes of the image's blobs (what a pull transfers)."""
    return image.archive.stat().st_size
