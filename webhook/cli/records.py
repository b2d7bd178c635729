"""Commands for pipelines and people: keys, record, promote, revoke, submit, history, trace."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from webhook import cluster_access, key_files, ledger, record_json, registry, registry_credentials
from webhook.cli.backend import Backend, BackendError, open_backend
from webhook.cli.options import BackendOptions, ExitCode, backend_options, grouped, load_policy
from webhook.cluster_listing import OWNER_CHAIN, ClusterError, Lister, now_rfc3339
from webhook.core import dsse, image_labels, keys, records, references
from webhook.core.records import Record, RecordKind
from webhook.running import where_it_runs, where_json, where_lines


@dataclass(frozen=True)
class EvidenceOptions:
    """The chain of custody a pipeline attaches to a promotion."""

    git_commit: str = ""
    git_repository: str = ""
    ci_run: str = ""
    ci_run_url: str = ""
    tests_passed: int | None = None
    tests_failed: int | None = None
    scanner: str = ""
    scan_critical: int | None = None
    scan_high: int | None = None
    scan_medium: int | None = None
    scan_low: int | None = None

    def tests(self) -> records.Tests | None:
        if self.tests_passed is None and self.tests_failed is None:
            return None
        return records.Tests(self.tests_passed or 0, self.tests_failed or 0)

    def scan(self) -> records.Scan | None:
        counts = {s: getattr(self, f"scan_{s}") for s in records.SEVERITIES}
        if all(v is None for v in counts.values()) and not self.scanner:
            return None
        return records.Scan(self.scanner, {s: v for s, v in counts.items() if v is not None})

    def source(self) -> records.Source:
        return records.Source(self.git_commit, self.git_repository, self.ci_run, self.ci_run_url)


@dataclass(frozen=True)
class SigningOptions:
    """Who signs and vouches for a record."""

    key_paths: tuple[Path, ...] = ()
    approvers: tuple[str, ...] = ()
    by: str = ""
    reason: str = ""
    envelope_out: Path | None = None

    def signers(self) -> list[keys.SigningKey]:
        """The private keys, read once per command."""
        if not self.key_paths:
            raise click.UsageError("--key is required (a private key from 'promotion-gate keys generate')")
        try:
            return [key_files.load_signing_key(p) for p in self.key_paths]
        except keys.InvalidKey as exc:
            raise click.BadParameter(str(exc), param_hint="--key") from exc


@dataclass(frozen=True)
class ImageOptions:
    """Where ``record`` reads the image from: its registry, with Docker's credentials."""

    no_registry: bool = False
    registry_ca_file: Path | None = None
    insecure_registry: bool = False
    docker_config: Path | None = None

    def registry(self) -> registry.RegistryOptions:
        return registry.RegistryOptions(ca_file=self.registry_ca_file, insecure=self.insecure_registry,
                                        docker_config=self.docker_config)


_image = grouped("image_options", ImageOptions, [
    click.option("--no-registry", is_flag=True,
                 help="Record IMAGE@DIGEST without reading the image from its registry (the source is not confirmed "
                      "by the image's labels)."),
    click.option("--registry-ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="CA bundle for the registry's certificate (a private registry)."),
    click.option("--insecure-registry", is_flag=True,
                 help="Registry on this machine only (localhost, 127.0.0.1, ::1): no TLS verification, or plain HTTP."),
    click.option("--docker-config", type=click.Path(file_okay=False, path_type=Path), envvar="DOCKER_CONFIG",
                 help="Directory of the Docker config.json with registry credentials [env: DOCKER_CONFIG; default: "
                      "~/.docker]."),
])
_evidence = grouped("evidence", EvidenceOptions, [
    click.option("--git-commit", default=""), click.option("--git-repository", default=""),
    click.option("--ci-run", "ci_run", default="", help="CI run id."), click.option("--ci-run-url", default=""),
    click.option("--tests-passed", type=click.IntRange(min=0)),
    click.option("--tests-failed", type=click.IntRange(min=0)),
    click.option("--scanner", default=""),
    *(click.option(f"--scan-{severity}", type=click.IntRange(min=0)) for severity in records.SEVERITIES),
])
_signing = grouped("signing", SigningOptions, [
    click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="Private key to sign with; repeat for several approvals."),
    click.option("--approver", "approvers", multiple=True, help="Name of an approver; repeatable."),
    click.option("--by", "by", default="", help="Identity promoting (default: the key id of the first key)."),
    click.option("--reason", default="", help="Free-text reason or ticket."),
    click.option("--envelope-out", type=click.Path(dir_okay=False, path_type=Path),
                 help="Also write the signed envelope to this file."),
])


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


def report(outcome: ledger.SubmitOutcome, backend: BackendOptions, success: str) -> None:
    """Print a submission's outcome and exit with its status: the same for every command that submits."""
    status, payload = record_json.outcome_json(outcome)
    if backend.json:
        click.echo(json.dumps({"status": status, **payload}, indent=2))
    elif isinstance(outcome, ledger.Stored):
        click.echo(success.format(id=outcome.id))
    else:
        click.echo(f"error: {status}: {payload.get('error', payload)}", err=True)
    match outcome:
        case ledger.Stored():
            return
        case ledger.Malformed():
            sys.exit(ExitCode.INPUT)
        case _:
            sys.exit(ExitCode.REFUSED)


def _sign_and_submit(target: Backend, options: BackendOptions, record: Record, signers: list[keys.SigningKey],
                     envelope_out: Path | None) -> None:
    envelope = dsse.sign(records.payload(record), signers)
    if envelope_out is not None:
        envelope_out.write_text(json.dumps(envelope.to_json(), indent=2) + "\n")
    outcome = target.submit(envelope, {"digest": record.digest, "environment": record.environment,
                                       "repository": record.repository})
    verb = "revoked from" if record.kind is RecordKind.REVOCATION else "recorded for"
    report(outcome, options, f"{record.reference} {verb} {record.environment}: record {{id}}")


def _promote(image: str, environment: str, promoted_from: str | None, evidence: EvidenceOptions,
             signing: SigningOptions, backend: BackendOptions, *, first: bool) -> None:
    ref = pinned(image)
    signers = signing.signers()
    by = signing.by or signers[0].key_id
    target = open_backend(backend, identity=by)
    if not first and promoted_from is None:
        names = target.environments()
        if environment not in names:
            raise click.BadParameter(f'no environment "{environment}" (defined: {", ".join(names) or "none"})',
                                     param_hint="--to")
        index = names.index(environment)
        promoted_from = names[index - 1] if index > 0 else None
    assert ref.digest is not None
    record = Record(kind=RecordKind.PROMOTION, repository=ref.repository, digest=ref.digest, environment=environment,
                    promoted_from=promoted_from, at=records.timestamp(datetime.now(UTC)), by=by,
                    source=evidence.source(), tests=evidence.tests(), scan=evidence.scan(),
                    approvers=signing.approvers, reason=signing.reason)
    _sign_and_submit(target, backend, record, signers, signing.envelope_out)


@click.group("keys")
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
    key_files.write_key_pair(key, out, public)
    click.echo(f"private key: {out}\npublic key:  {public}\nkey id:      {key.key_id}")


@keys_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def show(path: Path) -> None:
    """Print the key id (SHA-256 of the public key's DER SubjectPublicKeyInfo)."""
    try:
        key = key_files.load_verifying_key(path)
    except keys.InvalidKey as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{key.key_id}  {key.algorithm}")


def _registry_failure(exc: Exception, status: ExitCode) -> NoReturn:
    click.echo(f"error: {exc}; nothing was recorded", err=True)
    sys.exit(status)


def read_from_registry(ref: references.ImageReference, options: ImageOptions) -> registry.RegistryImage:
    """The image from its registry, or exit: 3 unreachable or unusable, 1 refused, 2 not found or misconfigured."""
    try:
        return registry.read_image(ref, options.registry())
    except registry.RegistryUnavailable as exc:
        _registry_failure(exc, ExitCode.UNAVAILABLE)
    except (registry.RegistryRefused, registry.TagMoved) as exc:
        _registry_failure(exc, ExitCode.REFUSED)
    except (registry.ImageNotFound, registry_credentials.CredentialsError, registry.InsecureRegistry) as exc:
        _registry_failure(exc, ExitCode.INPUT)


def _describe(image: registry.RegistryImage, asked: str) -> str:
    if image.is_index:
        shape = f"an index of {len(image.platforms)} image(s): {', '.join(p.platform for p in image.platforms)}"
    else:
        shape = f"one image: {image.platforms[0].platform or 'platform not given'}"
    return f"{asked} is {image.reference} ({shape})"


def _record_image(image_text: str, environment: str, evidence: EvidenceOptions, signing: SigningOptions,
                  image_options: ImageOptions, backend: BackendOptions) -> None:
    try:
        ref = references.parse(image_text)
    except references.InvalidReference as exc:
        raise click.BadParameter(f'"{image_text}" is not a valid image reference: {exc}', param_hint="IMAGE") from exc
    if image_options.no_registry:
        if ref.digest is None:
            raise click.BadParameter(f'"{image_text}" is a tag; only the registry can resolve it to a digest: drop '
                                     "--no-registry, or give IMAGE by digest (REPO@sha256:…)", param_hint="IMAGE")
        _promote(image_text, environment, None, evidence, signing, backend, first=True)
        return
    signers = signing.signers()
    image = read_from_registry(ref, image_options)
    click.echo(_describe(image, ref.written), err=True)
    try:
        confirmed = image_labels.reconcile(evidence.source(), image.platforms, image.reference)
    except image_labels.LabelConflict as exc:
        _registry_failure(exc, ExitCode.REFUSED)
    if confirmed.confirmed:
        words = [f.words for f in image_labels.FIELDS if f.name in confirmed.confirmed]
        click.echo("source confirmed by the image's labels: " + ", ".join(words), err=True)
    for note in confirmed.notes:
        click.echo(f"note: {note}", err=True)
    by = signing.by or signers[0].key_id
    record = Record(kind=RecordKind.PROMOTION, repository=image.repository, digest=image.digest,
                    environment=environment, at=records.timestamp(datetime.now(UTC)), by=by,
                    source=confirmed.source, tests=evidence.tests(), scan=evidence.scan(),
                    approvers=signing.approvers, reason=signing.reason, built_as=image.tag,
                    confirmed_by_labels=confirmed.confirmed)
    _sign_and_submit(open_backend(backend, identity=by), backend, record, signers, signing.envelope_out)


@click.command("record")
@click.argument("image")
@click.option("--env", "environment", required=True, help="The first environment, e.g. ci.")
@_evidence
@_signing
@_image
@backend_options
def record_cmd(image: str, environment: str, evidence: EvidenceOptions, signing: SigningOptions,
               image_options: ImageOptions, backend: BackendOptions) -> None:
    """Record build and test evidence for IMAGE in the first environment.

    IMAGE is REPO:TAG, REPO@DIGEST or REPO:TAG@DIGEST. The image is read from its registry: a tag is
    resolved to its digest (an index's own digest for a multi-platform image), and the labels of every
    platform's config (git.commit, ci.run, org.opencontainers.image.revision and .source) fill the
    source, or refuse a flag that contradicts them. Registry credentials come from Docker's config.json.
    """
    _record_image(image, environment, evidence, signing, image_options, backend)


@click.command("promote")
@click.argument("image")
@click.option("--to", "environment", required=True, help="Target environment.")
@click.option("--from", "promoted_from", help="Previous environment (default: the one before --to).")
@_evidence
@_signing
@backend_options
def promote_cmd(image: str, environment: str, promoted_from: str | None, evidence: EvidenceOptions,
                signing: SigningOptions, backend: BackendOptions) -> None:
    """Promote IMAGE@DIGEST to the next environment."""
    _promote(image, environment, promoted_from, evidence, signing, backend, first=False)


@click.command("revoke")
@click.argument("image")
@click.option("--env", "environment", required=True, help="Environment to withdraw the digest from.")
@click.option("--key", "key_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--by", "by", default="")
@click.option("--reason", required=True, help="Why (incident, CVE, ticket).")
@click.option("--envelope-out", type=click.Path(dir_okay=False, path_type=Path))
@backend_options
def revoke_cmd(image: str, environment: str, key_paths: tuple[Path, ...], by: str, reason: str,
               envelope_out: Path | None, backend: BackendOptions) -> None:
    """Withdraw IMAGE@DIGEST from an environment (a new, signed revocation record)."""
    ref = pinned(image)
    assert ref.digest is not None
    signers = SigningOptions(key_paths=key_paths).signers()
    by = by or signers[0].key_id
    record = Record(kind=RecordKind.REVOCATION, repository=ref.repository, digest=ref.digest,
                    environment=environment, at=records.timestamp(datetime.now(UTC)), by=by, reason=reason)
    _sign_and_submit(open_backend(backend, identity=by), backend, record, signers, envelope_out)


@click.command("submit")
@click.argument("envelope_file", type=click.File("rb"))
@backend_options
def submit_cmd(envelope_file: Any, backend: BackendOptions) -> None:
    """Submit a pre-signed DSSE envelope (for signatures gathered elsewhere)."""
    raw = envelope_file.read(dsse.MAX_ENVELOPE_BYTES + 1)
    try:
        signed = records.open_envelope(raw)
    except records.MalformedEnvelope as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.INPUT)
    outcome = open_backend(backend, identity=signed.record.by).submit(signed.envelope, {})
    report(outcome, backend, "stored record {id}")


@click.command("history")
@click.argument("image")
@click.option("--env", "environment", help="Only this environment.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@backend_options
def history_cmd(image: str, environment: str | None, limit: int, backend: BackendOptions) -> None:
    """Every record for a repository (or one digest), oldest first."""
    try:
        ref = references.parse(image)
    except references.InvalidReference as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGE") from exc
    found = open_backend(backend).records(repository=ref.repository, digest=ref.digest, environment=environment,
                                          limit=limit)
    if backend.json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no records for {ref.repository}")
    names = _key_names(backend)
    for item in found:
        click.echo(_record_line(item))
        for detail in custody(item, names):
            click.echo(f"      {detail}")


NO_CLUSTER_ACCESS = ("no cluster access: give --kubeconfig, set KUBECONFIG, or ask a server that runs with "
                     "--kubernetes")


def running_now(target: Backend, digest: str, kubeconfig: str | None, timeout: float) -> dict[str, Any]:
    """Where the digest runs: the server's answer, else this command's own listing, else why it is unknown."""
    unknown = ""
    try:
        answer = target.running(digest)
    except BackendError as exc:
        answer, unknown = None, str(exc)
    if answer is not None:
        return answer
    access = cluster_access.configured(kubeconfig, os.environ)
    if access is None:
        return {"unknown": unknown or NO_CLUSTER_ACCESS}
    try:
        lister = Lister(access.api_client(), timeout=timeout)
        inventory = lister.inventory(resources=OWNER_CHAIN)
    except ClusterError as exc:
        return {"unknown": str(exc)}
    except Exception as exc:  # the client raises ConfigException, OSError, ValueError, ...
        return {"unknown": f"cannot configure the Kubernetes client from {access.describe()}: {exc}"}
    return where_json(where_it_runs(inventory, digest, now_rfc3339()))


@click.command("trace")
@click.argument("digest")
@click.option("--cluster/--no-cluster", default=True, show_default=True,
              help="Also show where the digest runs now (from the server, or this command's cluster access).")
@click.option("--kubeconfig", help="kubeconfig for --cluster [default: $KUBECONFIG, in a pod its service account, "
                                   "else ~/.kube/config if it exists].")
@click.option("--request-timeout", type=click.FloatRange(0.5, 300), default=30.0, show_default=True,
              help="Seconds each request to the Kubernetes API server may take.")
@backend_options
def trace_cmd(digest: str, cluster: bool, kubeconfig: str | None, request_timeout: float,
              backend: BackendOptions) -> None:
    """The chain of custody of a digest: records, revocations, admissions that named it, where it runs now."""
    if "@" in digest:
        digest = digest.rsplit("@", 1)[1]
    if not references.is_digest(digest):
        raise click.BadParameter(f"{digest!r} is not sha256:<64 hex> or sha512:<128 hex>", param_hint="DIGEST")
    target = open_backend(backend)
    data = target.trace(digest)
    if cluster:
        data["running"] = running_now(target, digest, kubeconfig, request_timeout)
    if backend.json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"digest {digest}")
    for repository, states in data["states"].items():
        summary = ", ".join(f"{env}: {s['state']}" for env, s in states.items())
        click.echo(f"  {repository}: {summary}")
    click.echo("records:")
    names = _key_names(backend)
    for item in sorted(data["records"] + data["revocations"], key=lambda r: r["seq"]):
        click.echo("  " + _record_line(item))
        for detail in custody(item, names):
            click.echo(f"      {detail}")
    admissions = data["admissions"]
    more = (f" (the first {len(admissions)}; all of them: promotion-gate audit --image {digest})"
            if data.get("admissionsNext") is not None else "")
    click.echo(f"admissions: {len(admissions)}{more}")
    for event in admissions:
        verdict = "allowed" if event["allowed"] else "denied"
        omitted = f" ({event['omitted']})" if "omitted" in event else ""
        where = f"{event.get('kind', '?')} {event['namespace']}/{event.get('name', '?')}"
        click.echo(f"  {event['time']} {verdict} {where} by {event['user']} "
                   f"[{', '.join(event['reasons']) or 'ok'}]{omitted}")
    running = data.get("running")
    if running is not None:
        if "unknown" in running:
            click.echo(f"running now: unknown ({running['unknown']})")
        else:
            for line in where_lines(running):
                click.echo(line)


def _record_line(item: dict[str, Any]) -> str:
    if item["kind"] == RecordKind.REVOCATION:
        return (f"#{item['seq']} {item['at']} REVOKED {item['repository']}@{item['digest']} from "
                f"{item['environment']} by {item['by']}: {item['reason']} (record {item['id'][:12]})")
    origin = f" from {item['promotedFrom']}" if item.get("promotedFrom") else ""
    return (f"#{item['seq']} {item['at']} {item['repository']}@{item['digest']} -> {item['environment']}{origin} "
            f"by {item['by']} (record {item['id'][:12]})")


def _key_names(backend: BackendOptions) -> dict[str, str]:
    """Key id -> the ``--policy`` file's name for it: for servers that answer without ``signedBy``."""
    if backend.policy_path is None:
        return {}
    policy = load_policy(backend.policy_path)
    return {key.key_id: name for name, key in policy.named_keys.items()}


def _signers(item: dict[str, Any], names: dict[str, str]) -> str:
    if isinstance(item.get("signedBy"), list):
        return ", ".join(f"{s['name']} ({s['keyId'][:12]})" if s.get("name") and s.get("verified")
                         else f"{s['keyId'][:12]} (not verified)" for s in item["signedBy"])
    # The key ids written in the envelope: claims, named by the local policy when it knows them.
    return ", ".join(f"{names[k]} ({k[:12]}, claimed)" if k in names else f"{k[:12]} (claimed)"
                     for k in item.get("signers", []))


def custody(item: dict[str, Any], names: dict[str, str]) -> list[str]:
    """A record's chain-of-custody lines, for a person: what is absent is left out, not shown as "-"."""
    lines: list[str] = []
    if item["kind"] == RecordKind.PROMOTION:
        if item.get("builtAs"):
            lines.append(f"built as :{item['builtAs']}")
        source = item.get("source") or {}
        parts = []
        if source.get("gitCommit"):
            parts.append(f"git commit {source['gitCommit']}")
        run = " ".join(filter(None, (source.get("ciRunId"), f"({source['ciRunUrl']})" if source.get("ciRunUrl")
                                     else "")))
        if run:
            parts.append(f"CI run {run}")
        if source.get("repository"):
            parts.append(f"repository {source['repository']}")
        if parts:
            lines.append("source: " + ", ".join(parts))
            confirmed = item.get("confirmedByImageLabels") or []
            words = [f.words for f in image_labels.FIELDS if f.name in confirmed]
            lines.append("confirmed by image labels: " + ", ".join(words) if words
                         else "not confirmed by image labels")
        tests, scan = item.get("tests"), item.get("scan")
        if tests:
            lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed")
        if scan:
            counts = ", ".join(f"{k} {v}" for k, v in scan["findings"].items())
            lines.append("scan: " + ": ".join(filter(None, (scan.get("scanner"), counts or "no counts"))))
        if item.get("approvers"):
            lines.append(f"approvers: {', '.join(item['approvers'])}")
        if item.get("reason"):
            lines.append(f"reason: {item['reason']}")
    signers = _signers(item, names)
    if signers:
        lines.append(f"signed by: {signers}")
    return lines


COMMANDS = (keys_group, record_cmd, promote_cmd, revoke_cmd, submit_cmd, history_cmd, trace_cmd)
