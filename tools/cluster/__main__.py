"""A single-node Kubernetes cluster without Docker, for trying Promotion Gate and for tests/cluster.

    python -m tools.cluster deps        # Debian packages (containerd, runc, CNI, registry, buildah, ...)
    python -m tools.cluster images      # pause, Debian base and project image archives (cached)
    python -m tools.cluster up          # start it; prints the admin kubeconfig path
    python -m tools.cluster push        # push the project image to the local registry; prints the reference
    python -m tools.cluster status      # each component and whether its process runs
    python -m tools.cluster down        # stop everything, restore the host

Needs root. The Go binaries come from ``tools/build-toolchain.sh cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tools.cluster import config, deps, images
from tools.cluster.node import ClusterError, Node, pid_alive


def git_revision(source: Path) -> str:
    result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build_images(source: Path) -> dict[str, images.BuiltImage]:
    """The cluster's images; buildah and skopeo leave /var/lib/containers behind, so it is removed
    again when it did not exist before."""
    existed = Path("/var/lib/containers").exists()
    try:
        return {"pause": images.pause_image(), "base": images.base_image(),
                "promotion-gate": images.project_image(source, revision=git_revision(source))}
    finally:
        if not existed:
            subprocess.run(["rm", "-rf", "/var/lib/containers"], check=False)


def project_reference(image: images.BuiltImage) -> str:
    repository = f"{config.REGISTRY}/promotion-gate"
    digest = images.push(image, f"{repository}:{image.name.rsplit(':', 1)[1]}")
    return f"{repository}@{digest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["deps", "images", "up", "push", "status", "down"])
    parser.add_argument("--source", type=Path, default=config.REPO,
                        help="directory with the Dockerfile and the package to build (default: this repo)")
    parser.add_argument("--no-postgres", action="store_true", help="up: do not start the PostgreSQL store")
    args = parser.parse_args(argv)
    node = Node(with_postgres=not args.no_postgres)
    try:
        if args.command == "deps":
            deps.ensure_packages()
        elif args.command == "images":
            built = build_images(args.source.resolve())
            print(json.dumps({name: {"name": b.name, "digest": b.digest, "archive": str(b.archive),
                                     "bytes": images.image_size(b), "seconds": round(b.seconds, 1),
                                     "cached": b.cached} for name, b in built.items()}, indent=2))
        elif args.command == "up":
            deps.ensure_packages(install=os.geteuid() == 0)
            node.up()
            print(node.kubeconfig)
        elif args.command == "push":
            print(project_reference(build_images(args.source.resolve())["promotion-gate"]))
        elif args.command == "status":
            for name in config.COMPONENTS:
                pid_file = node.layout.pid_file(name)
                pid = int(pid_file.read_text()) if pid_file.exists() else None
                state = "running" if pid is not None and pid_alive(pid) else "stopped"
                print(f"{name:24} {state:8} {pid or ''}")
        elif args.command == "down":
            node.down()
    except (deps.MissingPrerequisite, ClusterError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
