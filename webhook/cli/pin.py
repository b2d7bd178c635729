"""``promotion-gate pin``: tags in manifests and Helm values files rewritten to promoted digests."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

import click

from webhook import manifests, pinning
from webhook.cli.backend import open_backend
from webhook.cli.options import BackendOptions, backend_options, load_policy
from webhook.core.promotion import TagPromotion, TagSubject


@click.command("pin")
@click.argument("paths", nargs=-1)
@click.option("--env", "environment", required=True, help="The environment whose promoted digests to pin.")
@click.option("--values", "values_files", multiple=True, type=click.Path(dir_okay=False),
              help="A Helm values file (image.repository + image.tag, or image: REF); repeatable.")
@click.option("--dry-run", is_flag=True, help="Report what would be pinned; write nothing.")
@backend_options
def pin(paths: tuple[str, ...], environment: str, values_files: tuple[str, ...], dry_run: bool,
        backend: BackendOptions) -> None:
    """Rewrite image tags in PATHS (manifests, directories) and --values files to the digests promoted
    to --env, keeping every comment and all formatting.

    A tag is pinned to the digest a valid record says was built as that tag and that stands promoted
    to the environment; the registry is never asked. Exit status: 0 every tag pinned, 1 some could not
    be (each is reported with the reason), 2 unreadable input, 3 the server or store is unreachable.
    """
    if not paths and not values_files:
        raise click.UsageError("give manifests (files or directories) and/or --values files to pin")
    target = open_backend(backend)
    names = target.environments()
    if environment not in names:
        raise click.BadParameter(f'no environment "{environment}" (defined: {", ".join(names) or "none"})',
                                 param_hint="--env")
    policy = load_policy(backend.policy_path)

    def answers(tags: Sequence[TagSubject]) -> Mapping[TagSubject, TagPromotion]:
        return target.tag_promotions(tags, environment)

    files = [(path, False) for path in manifests.expand(list(paths))] + [(path, True) for path in values_files]
    report = pinning.pin(files, policy, environment, answers, write=not dry_run)
    if backend.json:
        click.echo(json.dumps({
            "environment": environment, "dryRun": dry_run, "files": report.changed,
            "pinned": [{"where": p.where, "image": p.image, "pinned": p.pinned} for p in report.pinned],
            "notPinned": [{"where": n.where, "image": n.image, "why": n.why} for n in report.not_pinned],
            "alreadyPinned": report.already, "notes": report.notes, "errors": report.errors,
        }, indent=2))
        sys.exit(report.exit_code)
    for done in report.pinned:
        click.echo(f"pinned {done.where}: {done.image} -> {done.pinned}")
    for missed in report.not_pinned:
        click.echo(f"not pinned {missed.where}: {missed.image}: {missed.why}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    verb = "would be pinned" if dry_run else "pinned"
    click.echo(f"{len(report.pinned)} image(s) {verb} in {len(report.changed)} file(s), {len(report.not_pinned)} "
               f"not pinned, {report.already} already pinned by digest", err=True)
    sys.exit(report.exit_code)
