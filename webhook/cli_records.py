"""CLI commands for pipelines and people: keys, record, promote, revoke, history, trace."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from webhook import clients, dsse, keys, records, references
from webhook.policy import Policy, PolicyError, default_policy, load

EXIT_REFUSED = 1
EXIT_INPUT = 2
EXIT_UNREACHABLE = 3


def backend_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--server/--token-file/--ca-file or --store/--policy, shared by every record command."""
    options = [
        click.option("--server", envvar="PROMOTION_GATE_SERVER", help="Server URL [env: PROMOTION_GATE_SERVER]."),
        click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="PROMOTION_GATE_TOKEN_FILE", help="File with the API bearer token."),
        click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA bundle that signed the server's certificate."),
        click.option("--store", envvar="PROMOTION_GATE_STORE",
                     help="Use a local store instead: sqlite:///path or postgresql://…"),
        click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="PROMOTION_GATE_POLICY", help="Policy file (with --store: the promotion rules)."),
        click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        try:
            return func(**kwargs)
        except clients.BackendRefused as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_REFUSED)
        except clients.BackendError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)

    return wrapper


def load_policy(path: Path | None, *, usage: bool = False) -> Policy:
    """The policy file, or digest-only rules without one; errors exit 1 (2 with ``usage``, for ``check``)."""
    if path is None:
        return default_policy()
    try:
        return load(path)
    except PolicyError as exc:
        if usage:
            raise click.BadParameter(str(exc), param_hint="--policy") from exc
        raise click.ClickException(str(exc)) from exc


def _backend(kw: dict[str, Any], identity: str = "") -> clients.Backend:
    if kw.get("store") and not kw.get("policy_path"):
        raise click.UsageError("--store needs --policy: the promotion rules come from the policy file")
    return clients.backend(server=kw.get("server"), token_file=kw.get("token_file"), ca_file=kw.get("ca_file"),
                           store=kw.get("store"), policy=load_policy(kw.get("policy_path")), identity=identity)


def pinned(image: str) -> references.ImageReference:
    try:
        ref = references.parse(image)
    except references.InvalidReference as exc:
        raise click.BadParameter(f'"{image}" is not a valid image reference: {exc}', param_hint="IMAGE") from exc
    if ref.digest is None:
        raise click.BadParameter(
            f'"{image}" is a tag, not a digest; records are about one immutable build. Get its digest with '
            f"'crane digest {image}' or 'docker buildx imagetools inspect {image}', then use "
            f"{ref.written_name}@sha256:<digest>", param_hint="IMAGE")
    return ref


def _signers(paths: tuple[Path, ...]) -> list[keys.SigningKey]:
    if not paths:
        raise click.UsageError("--key is required (a private key from 'promotion-gate keys generate')")
    try:
        return [keys.load_signing_key(p) for p in paths]
    except keys.KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from exc


def _submit(kw: dict[str, Any], record: records.Record, signer_paths: tuple[Path, ...],
            envelope_out: Path | None) -> None:
    envelope = dsse.sign(records.payload(record), _signers(signer_paths))
    if envelope_out is not None:
        envelope_out.write_text(json.dumps(envelope.to_json(), indent=2) + "\n")
    status, payload = _backend(kw, record.by).submit(
        envelope, {"digest": record.digest, "environment": record.environment, "repository": record.repository})
    if kw["output"] == "json":
        click.echo(json.dumps({"status": status, **payload}, indent=2))
    elif status == 201:
        verb = "revoked from" if record.kind == "revocation" else "recorded for"
        click.echo(f"{record.reference} {verb} {record.environment}: record {payload['id']}")
    else:
        click.echo(f"error: {status}: {payload.get('error', payload)}", err=True)
    if status != 201:
        sys.exit(EXIT_REFUSED if status in (401, 403, 409, 422) else EXIT_INPUT)


def register(main: click.Group) -> None:
    @main.group("keys")
    def keys_group() -> None:
        """Generate and inspect signing keys (Ed25519 or ECDSA P-256)."""

    @keys_group.command("generate")
    @click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="Private key file (mode 0600); the public key goes to OUT.pub.")
    @click.option("--algorithm", type=click.Choice(keys.ALGORITHMS), default="ed25519", show_default=True)
    def generate(out: Path, algorithm: str) -> None:
        """Write a new private key and its public key."""
        if out.exists():
            raise click.ClickException(f"{out} exists; refusing to overwrite a key")
        key = keys.generate(algorithm)
        public = out.with_name(out.name + ".pub")
        keys.write_key_pair(key, out, public)
        click.echo(f"private key: {out}\npublic key:  {public}\nkey id:      {key.key_id}")

    @keys_group.command("show")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    def show(path: Path) -> None:
        """Print the key id (SHA-256 of the public key's DER SubjectPublicKeyInfo)."""
        try:
            key = keys.load_verifying_key(path)
        except keys.KeyFileError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{key.key_id}  {key.algorithm}")

    evidence = [
        click.option("--git-commit", default=""), click.option("--git-repository", default=""),
        click.option("--ci-run", "ci_run", default="", help="CI run id."), click.option("--ci-run-url", default=""),
        click.option("--tests-passed", type=click.IntRange(min=0)),
        click.option("--tests-failed", type=click.IntRange(min=0)),
        click.option("--scanner", default=""),
        *(click.option(f"--scan-{severity}", type=click.IntRange(min=0)) for severity in records.SEVERITIES),
    ]
    common = [
        click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="Private key to sign with; repeat for several approvals."),
        click.option("--approver", "approvers", multiple=True, help="Name of an approver; repeatable."),
        click.option("--by", "by", default="", help="Identity promoting (default: the key id of the first key)."),
        click.option("--reason", default="", help="Free-text reason or ticket."),
        click.option("--envelope-out", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write the signed envelope to this file."),
    ]

    def with_options(opts: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def apply(func: Callable[..., Any]) -> Callable[..., Any]:
            for option in reversed(opts):
                func = option(func)
            return func
        return apply

    def build_record(ref: references.ImageReference, environment: str, promoted_from: str | None,
                     kw: dict[str, Any]) -> records.Record:
        tests = None
        if kw.get("tests_passed") is not None or kw.get("tests_failed") is not None:
            tests = records.Tests(kw.get("tests_passed") or 0, kw.get("tests_failed") or 0)
        severities = {s: kw.get(f"scan_{s}") for s in records.SEVERITIES}
        scan = None
        if any(v is not None for v in severities.values()) or kw.get("scanner"):
            scan = records.Scan(kw.get("scanner", ""), {s: v for s, v in severities.items() if v is not None})
        by = kw["by"] or (_signers(kw["key_paths"])[0].key_id if kw["key_paths"] else "")
        assert ref.digest is not None
        return records.Record(
            "promotion", ref.repository, ref.digest, environment, promoted_from, records.now(), by,
            records.Source(kw.get("git_commit", ""), kw.get("git_repository", ""), kw.get("ci_run", ""),
                           kw.get("ci_run_url", "")),
            tests, scan, tuple(kw["approvers"]), kw["reason"])

    @main.command("record")
    @click.argument("image")
    @click.option("--env", "environment", required=True, help="The first environment, e.g. ci.")
    @with_options(evidence + common)
    @backend_options
    def record_cmd(image: str, environment: str, **kw: Any) -> None:
        """Record build and test evidence for IMAGE@DIGEST in the first environment."""
        ref = pinned(image)
        _submit(kw, build_record(ref, environment, None, kw), kw["key_paths"], kw["envelope_out"])

    @main.command("promote")
    @click.argument("image")
    @click.option("--to", "environment", required=True, help="Target environment.")
    @click.option("--from", "promoted_from", help="Previous environment (default: the one before --to).")
    @with_options(evidence + common)
    @backend_options
    def promote_cmd(image: str, environment: str, promoted_from: str | None, **kw: Any) -> None:
        """Promote IMAGE@DIGEST to the next environment."""
        ref = pinned(image)
        if promoted_from is None:
            names = _backend(kw).environments()
            if environment not in names:
                raise click.BadParameter(f'no environment "{environment}" (defined: {", ".join(names) or "none"})',
                                         param_hint="--to")
            index = names.index(environment)
            promoted_from = names[index - 1] if index > 0 else None
        _submit(kw, build_record(ref, environment, promoted_from, kw), kw["key_paths"], kw["envelope_out"])

    @main.command("revoke")
    @click.argument("image")
    @click.option("--env", "environment", required=True, help="Environment to withdraw the digest from.")
    @click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--by", "by", default="")
    @click.option("--reason", required=True, help="Why (incident, CVE, ticket).")
    @click.option("--envelope-out", type=click.Path(dir_okay=False, path_type=Path))
    @backend_options
    def revoke_cmd(image: str, environment: str, key_paths: tuple[Path, ...], by: str, reason: str,
                   envelope_out: Path | None, **kw: Any) -> None:
        """Withdraw IMAGE@DIGEST from an environment (a new, signed revocation record)."""
        ref = pinned(image)
        assert ref.digest is not None
        signer_id = _signers(key_paths)[0].key_id
        record = records.Record("revocation", ref.repository, ref.digest, environment, None, records.now(),
                                by or signer_id, reason=reason)
        _submit(kw, record, key_paths, envelope_out)

    @main.command("submit")
    @click.argument("envelope_file", type=click.File("rb"))
    @backend_options
    def submit_cmd(envelope_file: Any, **kw: Any) -> None:
        """Submit a pre-signed DSSE envelope (for signatures gathered elsewhere)."""
        raw = envelope_file.read(dsse.MAX_ENVELOPE_BYTES + 1)
        try:
            envelope = dsse.parse(raw)
            record = records.parse_statement(envelope.payload)
        except (dsse.EnvelopeError, records.RecordError) as exc:
            click.echo(f"error: malformed envelope: {exc}", err=True)
            sys.exit(EXIT_INPUT)
        status, payload = _backend(kw, record.by).submit(envelope, {})
        if kw["output"] == "json":
            click.echo(json.dumps({"status": status, **payload}, indent=2))
        elif status == 201:
            click.echo(f"stored record {payload.get('id')}")
        else:
            click.echo(f"error: {status}: {payload.get('error')}", err=True)
        if status != 201:
            sys.exit(EXIT_REFUSED)

    @main.command("history")
    @click.argument("image")
    @click.option("--env", "environment", help="Only this environment.")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
    @backend_options
    def history_cmd(image: str, environment: str | None, limit: int, **kw: Any) -> None:
        """Every record for a repository (or one digest), oldest first."""
        try:
            ref = references.parse(image)
        except references.InvalidReference as exc:
            raise click.BadParameter(str(exc), param_hint="IMAGE") from exc
        found = _backend(kw).records(repository=ref.repository, digest=ref.digest, environment=environment,
                                     limit=limit)
        if kw["output"] == "json":
            click.echo(json.dumps(found, indent=2))
            return
        if not found:
            click.echo(f"no records for {ref.repository}")
        for item in found:
            click.echo(_record_line(item))

    @main.command("trace")
    @click.argument("digest")
    @backend_options
    def trace_cmd(digest: str, **kw: Any) -> None:
        """The chain of custody of a digest: records, revocations, and admissions that named it."""
        if "@" in digest:
            digest = digest.rsplit("@", 1)[1]
        if not references.is_digest(digest):
            raise click.BadParameter(f"{digest!r} is not sha256:<64 hex> or sha512:<128 hex>", param_hint="DIGEST")
        data = _backend(kw).trace(digest)
        if kw["output"] == "json":
            click.echo(json.dumps(data, indent=2))
            return
        click.echo(f"digest {digest}")
        for repository, states in data["states"].items():
            summary = ", ".join(f"{env}: {s['state']}" for env, s in states.items())
            click.echo(f"  {repository}: {summary}")
        click.echo("records:")
        for item in sorted(data["records"] + data["revocations"], key=lambda r: r["seq"]):
            click.echo("  " + _record_line(item))
            if item["kind"] == "promotion":
                src, tests, scan = item["source"], item["tests"], item["scan"]
                click.echo(f"      source: commit {src['gitCommit'] or '-'} repo {src['repository'] or '-'} "
                           f"ci run {src['ciRunId'] or '-'} {src['ciRunUrl']}".rstrip())
                if tests:
                    click.echo(f"      tests: {tests['passed']} passed, {tests['failed']} failed")
                if scan:
                    counts = ", ".join(f"{k} {v}" for k, v in scan["findings"].items())
                    click.echo(f"      scan: {scan['scanner'] or '-'}: {counts or 'no counts'}")
                click.echo(f"      approvers: {', '.join(item['approvers']) or '-'}; "
                           f"signed by: {', '.join(k[:12] for k in item['signers'])}")
        click.echo(f"admissions: {len(data['admissions'])}")
        for event in data["admissions"]:
            verdict = "allowed" if event["allowed"] else "denied"
            click.echo(f"  {event['time']} {verdict} {event['kind']} {event['namespace']}/{event['name']} "
                       f"by {event['user']} [{', '.join(event['reasons']) or 'ok'}]")


def _record_line(item: dict[str, Any]) -> str:
    if item["kind"] == "revocation":
        return (f"#{item['seq']} {item['at']} REVOKED {item['repository']}@{item['digest']} from "
                f"{item['environment']} by {item['by']}: {item['reason']} (record {item['id'][:12]})")
    origin = f" from {item['promotedFrom']}" if item.get("promotedFrom") else ""
    return (f"#{item['seq']} {item['at']} {item['repository']}@{item['digest']} -> {item['environment']}{origin} "
            f"by {item['by']} (record {item['id'][:12]})")
