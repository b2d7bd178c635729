"""``promotion-gate``: the command-line shell (click) around the policy core and the store."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from webhook import certs as certs_mod
from webhook import check as check_mod
from webhook import decision
from webhook.cli_records import load_policy


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="promotion-gate")
def main() -> None:
    """Admit only image digests that were promoted to the target environment."""


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("var/certs"),
              show_default=True, help="Where to write ca.crt, tls.crt and tls.key.")
@click.option("--host", "hosts", multiple=True, default=certs_mod.DEFAULT_HOSTS, show_default=True,
              help="Subject alternative name (IP or DNS); repeat for several.")
@click.option("--force", is_flag=True, help="Replace existing certificates.")
def certs(directory: Path, hosts: tuple[str, ...], force: bool) -> None:
    """Generate a development CA and a serving certificate (kept if present)."""
    ca, crt, key = certs_mod.ensure_dev_certificates(directory, tuple(hosts), force=force)
    click.echo(f"CA certificate:      {ca}\nserving certificate: {crt}\nserving key:         {key}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (default: digest-only rules).")
@click.option("--environment", help="Also require promotion records for this environment.")
@click.option("--server", help="Promotion Gate server URL to read records from.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="Bearer token for --server.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="CA bundle for --server.")
@click.option("--store", help="Read records from a local store: sqlite:///path or a PostgreSQL URL.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def check(paths: tuple[str, ...], policy_path: Path | None, environment: str | None, server: str | None,
          token_file: Path | None, ca_file: Path | None, store: str | None, output: str) -> None:
    """Check manifests (files, directories, '-' for stdin) before applying them.

    Exit status: 0 when everything would be admitted, 1 when anything would be denied, 2 when input
    cannot be read.
    """
    policy = load_policy(policy_path, usage=True)
    records: decision.RecordView = decision.NoRecords()
    if environment is not None:
        if policy.environments and policy.environment(environment) is None:
            raise click.UsageError(f"--environment: no environment named {environment!r} in the policy")
        if not (server or store):
            raise click.UsageError("--environment needs --server or --store to look up promotion records")
        if store and policy_path is None:
            raise click.UsageError("--store needs --policy: the promotion rules come from the policy file")
        from webhook import clients

        try:
            records = clients.record_view(server=server, token_file=token_file, ca_file=ca_file, store=store,
                                          policy=policy)
        except clients.BackendError as exc:
            raise click.UsageError(str(exc)) from exc
    report = check_mod.run(list(paths), policy, environment, records)
    if output == "json":
        emit_json({
            "checked": report.checked,
            "denied": report.denied,
            "findings": [{"where": w, "reason": str(f.reason), "line": f.line, "object": f.subject,
                          "field": f.field_path, "container": f.container, "image": f.image}
                         for w, f in report.findings],
            "warnings": [{"where": w, "line": line} for w, line in report.warnings],
            "errors": report.errors,
        })
    else:
        for where, finding in report.findings:
            click.echo(f"{finding.line}  ({where})")
        for where, line in report.warnings:
            click.echo(f"warning: {line}  ({where})", err=True)
        for line in report.errors:
            click.echo(f"error: {line}", err=True)
        if not report.errors:
            summary = (f"{report.checked} workload(s) checked, {report.denied} would be denied"
                       if report.checked else "no workloads found")
            click.echo(summary, err=True)
    sys.exit(report.exit_code)


@main.command()
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="PROMOTION_GATE_POLICY", help="Policy file [env: PROMOTION_GATE_POLICY].")
@click.option("--bind", default="127.0.0.1:8443", show_default=True, help="Address to listen on.")
@click.option("--cert-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/certs"),
              show_default=True, help="Directory with tls.crt and tls.key.")
@click.option("--dev-certs", is_flag=True, help="Generate a development CA and certificate if missing.")
@click.option("--store", envvar="PROMOTION_GATE_STORE",
              help="sqlite:///path or postgresql://… [env: PROMOTION_GATE_STORE]; none: digest-only.")
@click.option("--server-key", type=click.Path(dir_okay=False, path_type=Path), envvar="PROMOTION_GATE_SERVER_KEY",
              help="Signing key for audit checkpoints [env: PROMOTION_GATE_SERVER_KEY].")
@click.option("--kubernetes/--no-kubernetes", "use_kubernetes", default=None,
              help="Read namespace labels from the Kubernetes API (default: when running in a cluster).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--baseline-endpoint", is_flag=True, hidden=True, help="Expose /baseline/allow for benchmarks.")
def serve(policy_path: Path | None, bind: str, cert_dir: Path, dev_certs: bool, store: str | None,
          server_key: Path | None, use_kubernetes: bool | None, workers: int, threads: int,
          baseline_endpoint: bool) -> None:
    """Serve the admission webhook (and the record API) over HTTPS."""
    from webhook import runtime
    from webhook import serve as serve_mod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    policy = load_policy(policy_path)
    if dev_certs:
        certs_mod.ensure_dev_certificates(cert_dir)
    certfile, keyfile = cert_dir / "tls.crt", cert_dir / "tls.key"
    for path in (certfile, keyfile):
        if not path.is_file():
            raise click.ClickException(
                f"{path} not found; run 'promotion-gate certs --dir {cert_dir}' or use --dev-certs")
    settings = runtime.Settings(policy=policy, store_url=store, server_key=server_key,
                                use_kubernetes=use_kubernetes, enable_baseline=baseline_endpoint)
    runtime.preflight(settings)
    options = serve_mod.ServerOptions(bind=bind, certfile=certfile, keyfile=keyfile, workers=workers,
                                      threads=threads)
    click.echo(f"promotion-gate serving https://{bind}/validate (policy {policy_path or 'built-in default'}, "
               f"store {runtime.describe_store(store)})", err=True)
    serve_mod.GunicornServer(options, lambda: runtime.build_app(settings)).run()


from webhook import cli_audit, cli_operator, cli_records  # noqa: E402  (commands register themselves on main)

cli_records.register(main)
cli_audit.register(main)
cli_operator.register(main)

if __name__ == "__main__":
    main()
