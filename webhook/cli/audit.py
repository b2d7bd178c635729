"""Commands for security teams: query, verify, checkpoint and prune the decision log."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import click

from webhook import key_files
from webhook.cli.backend import BackendError, open_backend, open_local_store
from webhook.cli.options import BackendOptions, ExitCode, backend_options, store_option
from webhook.core import keys
from webhook.decision_log import now_rfc3339
from webhook.store import SqlStore
from webhook.store.audit_chain import checkpoint_message, verify


def _store(url: str) -> SqlStore:
    try:
        store: SqlStore = open_local_store(url)
    except BackendError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    return store


def _public_keys(paths: tuple[Path, ...]) -> list[keys.VerifyingKey] | None:
    if not paths:
        return None
    try:
        return [key_files.load_verifying_key(p) for p in paths]
    except keys.InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from exc


@click.group("audit", invoke_without_command=True)
@click.option("--since", help="From this time (RFC 3339, e.g. 2026-11-25T00:00:00Z).")
@click.option("--until", help="Before this time (RFC 3339).")
@click.option("--namespace")
@click.option("--user")
@click.option("--image", help="Image reference with digest, or a bare digest.")
@click.option("--reason", help="Reason code, e.g. break-glass or not-promoted.")
@click.option("--allowed/--denied", "allowed", default=None, help="Only allowed or only denied decisions.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100000))
@backend_options
@click.pass_context
def audit_group(ctx: click.Context, /, since: str | None, until: str | None, namespace: str | None,
                user: str | None, image: str | None, reason: str | None, allowed: bool | None, limit: int,
                backend: BackendOptions) -> None:
    """Query admission decisions (JSON lines with --output json)."""
    if ctx.invoked_subcommand is not None:
        return
    digest = image.rsplit("@", 1)[-1] if image else None
    events = open_backend(backend).audit(since=since, until=until, namespace=namespace, user=user, digest=digest,
                                         reason=reason, allowed=allowed, limit=limit)
    for event in events:
        if backend.json:
            click.echo(json.dumps(event, sort_keys=True))
            continue
        verdict = "ALLOWED" if event["allowed"] else "DENIED "
        extra = f" break-glass: {event['breakGlass']}" if event.get("breakGlass") else ""
        dry = " (dry run)" if event.get("dryRun") else ""
        click.echo(f"#{event.get('seq', '?')} {event['time']} {verdict} {event['operation']} {event['kind']} "
                   f"{event['namespace']}/{event['name']} by {event['user']} "
                   f"[{', '.join(event['reasons']) or 'ok'}]{extra}{dry}")
        for line in event.get("findings", []):
            click.echo(f"    {line}")


@audit_group.command("verify")
@store_option(required=True)
@click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The server's public key, to check signed checkpoints; repeatable.")
def verify_cmd(store: str, key_paths: tuple[Path, ...]) -> None:
    """Check the hash chain and the signed checkpoints; exit 1 naming the first bad event."""
    report = verify(_store(store), _public_keys(key_paths))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.ok:
        click.echo(f"audit log intact: {report.events} events, {report.checkpoints_verified} signed "
                   "checkpoints verified")
        return
    for problem in report.problems:
        click.echo(f"audit log TAMPERED: {problem}")
    sys.exit(ExitCode.REFUSED)


@audit_group.command("checkpoint")
@store_option(required=True)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The server's private key.")
def checkpoint_cmd(store: str, key_path: Path) -> None:
    """Sign a checkpoint at the current head of the chain."""
    log = _store(store)
    head = log.audit_head()
    if head is None:
        raise click.ClickException("the audit log is empty; nothing to checkpoint")
    try:
        key = key_files.load_signing_key(key_path)
    except keys.InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from exc
    seq, digest = head
    signature = base64.b64encode(key.sign(checkpoint_message(seq, digest))).decode()
    log.add_checkpoint(seq, digest, now_rfc3339(), key.key_id, signature)
    click.echo(f"checkpoint at event {seq} ({digest[:16]}…) signed by {key.key_id[:12]}")


@audit_group.command("prune")
@store_option(required=True)
@click.option("--key", "key_paths", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The server's public key.")
@click.option("--before", "before", required=True, help="Prune events older than this time (RFC 3339).")
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the pruned events here first, as JSON lines.")
def prune_cmd(store: str, key_paths: tuple[Path, ...], before: str, archive: Path | None) -> None:
    """Delete old events up to the newest signed checkpoint before a time, keeping the chain verifiable."""
    log = _store(store)
    report = verify(log, _public_keys(key_paths))
    if not report.ok:
        raise click.ClickException(f"refusing to prune a log that does not verify: {report.problems[0]}")
    events = {e["seq"]: e for e in log.query_audit(until=before, limit=10_000_000)}
    candidates = [cp for cp in log.checkpoints() if cp.event_seq in events]
    if not candidates:
        raise click.ClickException(f"no signed checkpoint covers events before {before}; run "
                                   "'promotion-gate audit checkpoint' first")
    anchor = max(candidates, key=lambda cp: cp.event_seq)
    if archive is not None:
        with archive.open("w") as handle:
            for row in log.audit_rows(after=0, limit=anchor.event_seq):
                if row.seq <= anchor.event_seq:
                    handle.write(row.event + "\n")
    removed = log.prune_audit(anchor.event_seq)
    click.echo(f"pruned {removed} events up to event {anchor.event_seq} (checkpoint {anchor.seq})")
