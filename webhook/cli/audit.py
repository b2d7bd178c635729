"""Commands for security teams: query, verify, checkpoint, anchor and prune the decision log."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
import orjson

from webhook import key_files
from webhook.cli.backend import BackendError, open_backend, open_local_store
from webhook.cli.options import BackendOptions, ExitCode, backend_options, store_option
from webhook.core import keys
from webhook.store import SqlStore, StoreError
from webhook.store.audit_chain import advance_anchor, newest_anchor, verify
from webhook.store.audit_format import Checkpoint, Sealer, checkpoint_from_json, parse_time

MAX_ANCHOR_DOCUMENT_BYTES = 1024 * 1024
ANCHOR_KEY = "checkpoint.json"  # the ConfigMap's data key (webhook.operator.audit_anchor)
DEFAULT_EVERY, DEFAULT_SECONDS = 100, 60  # the schedule a first manual checkpoint promises


def _store(url: str) -> SqlStore:
    try:
        store: SqlStore = open_local_store(url)
    except BackendError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    return store


def _public_keys(paths: tuple[Path, ...], hint: str = "--key") -> list[keys.VerifyingKey] | None:
    if not paths:
        return None
    try:
        return [key_files.load_verifying_key(p) for p in paths]
    except keys.InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from exc


def _signing_key(path: Path) -> keys.SigningKey:
    try:
        return key_files.load_signing_key(path)
    except keys.InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from exc


def _event_line(event: dict[str, Any]) -> str:
    verdict = "ALLOWED" if event.get("allowed") else "DENIED "
    if "omitted" in event:
        return (f"#{event.get('seq', '?')} {event.get('time')} {verdict} {event.get('namespace')} by "
                f"{event.get('user')} [{', '.join(event.get('reasons', [])) or 'ok'}] ({event['omitted']})")
    extra = f" break-glass: {event['breakGlass']}" if event.get("breakGlass") else ""
    dry = " (dry run)" if event.get("dryRun") else ""
    return (f"#{event.get('seq', '?')} {event['time']} {verdict} {event['operation']} {event['kind']} "
            f"{event['namespace']}/{event['name']} by {event['user']} "
            f"[{', '.join(event['reasons']) or 'ok'}]{extra}{dry}")


@click.group("audit", invoke_without_command=True)
@click.option("--since", help="From this time (RFC 3339, e.g. 2026-11-25T00:00:00Z).")
@click.option("--until", help="Before this time (RFC 3339).")
@click.option("--namespace")
@click.option("--user")
@click.option("--image", help="Image reference with digest, or a bare digest.")
@click.option("--reason", help="Reason code, e.g. break-glass or not-promoted.")
@click.option("--allowed/--denied", "allowed", default=None, help="Only allowed or only denied decisions.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100000000))
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
        click.echo(_event_line(event))
        for line in event.get("findings", []):
            click.echo(f"    {line}")


def _anchors_in(handle: IO[bytes]) -> Iterator[Checkpoint]:
    """Published checkpoints in a decision log (JSON lines), an anchor file, or a ConfigMap as JSON."""
    found = False
    head = b""
    for line in handle:
        if len(head) <= MAX_ANCHOR_DOCUMENT_BYTES:
            head += line
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        for checkpoint in _anchors_of(document):
            found = True
            yield checkpoint
    if not found and len(head) <= MAX_ANCHOR_DOCUMENT_BYTES:  # one document over several lines
        try:
            yield from _anchors_of(orjson.loads(head))
        except orjson.JSONDecodeError:
            return


def _anchors_of(document: Any) -> Iterator[Checkpoint]:
    checkpoint = checkpoint_from_json(document)
    if checkpoint is not None:
        yield checkpoint
        return
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        data = document.get("data")
        text = data.get(ANCHOR_KEY) if isinstance(data, dict) else None
        if isinstance(text, str):
            try:
                yield from _anchors_of(orjson.loads(text))
            except orjson.JSONDecodeError:
                return


def _read_anchors(paths: tuple[str, ...]) -> list[Checkpoint]:
    chosen: list[Checkpoint] = []
    for path in paths:
        try:
            if path == "-":
                newest = newest_anchor(list(_anchors_in(sys.stdin.buffer)))
            else:
                with open(path, "rb") as handle:
                    newest = newest_anchor(list(_newest_only(_anchors_in(handle))))
        except OSError as exc:
            raise click.BadParameter(f"{path}: cannot read: {exc.strerror}", param_hint="--anchor") from exc
        if newest is None:
            raise click.BadParameter(f'{path} holds no published audit checkpoint (a JSON line with "msg": '
                                     '"audit checkpoint")', param_hint="--anchor")
        chosen.append(newest)
    return chosen


def _newest_only(checkpoints: Iterator[Checkpoint]) -> Iterator[Checkpoint]:
    """A decision log can hold many checkpoints; keeping only the newest keeps memory bounded."""
    newest: Checkpoint | None = None
    for checkpoint in checkpoints:
        if newest is None or checkpoint.seq > newest.seq:
            newest = checkpoint
    if newest is not None:
        yield newest


@audit_group.command("verify")
@store_option(required=True)
@click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The server's public key, to check signed checkpoints; repeatable.")
@click.option("--anchor", "anchor_paths", multiple=True, metavar="FILE",
              help="A copy of published checkpoints kept outside the database: the server's log (JSON lines), "
                   "the operator's ConfigMap (kubectl get configmap … -o json), or an 'audit anchor' file; "
                   "'-' reads stdin. Repeatable.")
def verify_cmd(store: str, key_paths: tuple[Path, ...], anchor_paths: tuple[str, ...]) -> None:
    """Check the hash chains and the signed checkpoints; exit 1 naming the first problem."""
    trusted = _public_keys(key_paths)
    if anchor_paths and trusted is None:
        raise click.UsageError("--anchor needs --key: an anchor counts only when its signature is checked")
    anchors = _read_anchors(anchor_paths)
    try:
        report = verify(_store(store), trusted, anchors=anchors)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.ok:
        anchor = newest_anchor(anchors)
        anchored = f", anchored at checkpoint {anchor.seq}" if anchor is not None else ""
        click.echo(f"audit log intact: {report.events} events, {report.checkpoints_verified} signed "
                   f"checkpoints verified{anchored}")
        return
    for problem in report.problems:
        click.echo(f"audit log TAMPERED: {problem}")
    sys.exit(ExitCode.REFUSED)


@audit_group.command("checkpoint")
@store_option(required=True)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The server's private key.")
def checkpoint_cmd(store: str, key_path: Path) -> None:
    """Sign a checkpoint at the current head of the chain (e.g. to seal the log of a stopped server)."""
    log = _store(store)
    if log.audit_head() is None:
        raise click.ClickException("the audit log is empty; nothing to checkpoint")
    key = _signing_key(key_path)
    checkpoint, _ = log.seal(Sealer(key, DEFAULT_EVERY, DEFAULT_SECONDS), force=True, keep_schedule=True)
    if checkpoint is None:
        head = log.checkpoint_head()
        covered = f"checkpoint {head.seq} covers event {head.event_seq}" if head else "nothing new"
        click.echo(f"nothing to checkpoint: {covered}")
        return
    click.echo(f"checkpoint {checkpoint.seq} at event {checkpoint.event_seq} ({checkpoint.event_hash[:16]}…) "
               f"signed by {key.key_id[:12]}")


@audit_group.command("anchor")
@store_option(required=True)
@click.option("--key", "key_paths", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The server's public key; repeatable.")
@click.option("--file", "anchor_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The anchor file to keep (created if missing).")
def anchor_cmd(store: str, key_paths: tuple[Path, ...], anchor_file: Path) -> None:
    """Keep a copy of the newest signed checkpoint outside the database (run it on a schedule).

    The file moves forward only while the log still holds the checkpoint it names: a truncated or
    rewritten log leaves it unchanged, and 'audit verify --anchor FILE' then says what happened.
    """
    trusted = _public_keys(key_paths) or []
    anchored = None
    if anchor_file.exists():
        anchored = _read_anchors((str(anchor_file),))[0]
    try:
        outcome = advance_anchor(_store(store), trusted, anchored)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    if outcome.problem is not None:
        click.echo(f"audit log TAMPERED: {outcome.problem}; {anchor_file} was kept")
        sys.exit(ExitCode.REFUSED)
    checkpoint = outcome.checkpoint
    if checkpoint is None:
        click.echo("the audit log has no signed checkpoint yet; nothing to anchor")
        return
    if outcome.advanced_from(anchored):
        temporary = anchor_file.with_name(anchor_file.name + ".tmp")
        temporary.write_bytes(orjson.dumps(checkpoint.to_json()) + b"\n")
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(anchor_file)
    click.echo(f"anchored checkpoint {checkpoint.seq} (event {checkpoint.event_seq}, {checkpoint.created_at})")


@audit_group.command("prune")
@store_option(required=True)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The server's private key: it signs the prune marker.")
@click.option("--trusted-key", "trusted_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Another public key whose older checkpoints count (after a key rotation); repeatable.")
@click.option("--before", "before", required=True, help="Prune events older than this time (RFC 3339).")
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the pruned events here first, as JSON lines.")
def prune_cmd(store: str, key_path: Path, trusted_paths: tuple[Path, ...], before: str, archive: Path | None) -> None:
    """Delete events older than a time, leaving a signed prune marker so that what remains still verifies."""
    if parse_time(before) is None:
        raise click.BadParameter(f"{before!r} is not an RFC 3339 time such as 2026-11-25T00:00:00Z",
                                 param_hint="--before")
    key = _signing_key(key_path)
    log = _store(store)
    report = verify(log, [key.verifying, *(_public_keys(trusted_paths, "--trusted-key") or [])])
    if not report.ok:
        raise click.ClickException(f"refusing to prune a log that does not verify: {report.problems[0]}")
    up_to = log.newest_seq_before(before)
    expected = log.event_hash(up_to) if up_to is not None else None
    if up_to is None or expected is None:
        raise click.ClickException(f"no event is older than {before}; nothing to prune")
    if archive is not None:
        with archive.open("w") as handle:
            for stored in log.events():
                if stored.seq > up_to:
                    break
                handle.write(f"{stored.text}\n")
            handle.flush()
            os.fsync(handle.fileno())
    head = log.checkpoint_head()
    sealer = Sealer(key, head.every if head else DEFAULT_EVERY, head.seconds if head else DEFAULT_SECONDS)
    marker, removed = log.prune_audit(sealer, up_to, expected)
    click.echo(f"pruned {removed} events up to event {up_to} (signed prune marker: checkpoint {marker.seq})")
