"""``promotion-gate check``: the admission policy run over manifests before they are applied."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from webhook import check as check_mod
from webhook.cli.backend import BackendError, open_backend
from webhook.cli.options import BackendOptions, Output, load_policy, output_option, store_option
from webhook.core.promotion import NoRecords, RecordView


@click.command("check")
@click.argument("paths", nargs=-1, required=True)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (default: digest-only rules).")
@click.option("--environment", help="Also require promotion records for this environment.")
@click.option("--server", help="Promotion Gate server URL to read records from.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="Bearer token for --server.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="CA bundle for --server.")
@store_option(help="Read records from a local store: sqlite:///path or a PostgreSQL URL.")
@output_option
def check(paths: tuple[str, ...], policy_path: Path | None, environment: str | None, server: str | None,
          token_file: Path | None, ca_file: Path | None, store: str | None, output: Output) -> None:
    """Check manifests (files, directories, '-' for stdin) before applying them.

    Exit status: 0 when everything would be admitted, 1 when anything would be denied, 2 when input
    cannot be read.
    """
    policy = load_policy(policy_path, usage=True)
    records: RecordView = NoRecords()
    if environment is not None:
        if policy.environments and policy.environment(environment) is None:
            raise click.UsageError(f"--environment: no environment named {environment!r} in the policy")
        if not (server or store):
            raise click.UsageError("--environment needs --server or --store to look up promotion records")
        if store and policy_path is None:
            raise click.UsageError("--store needs --policy: the promotion rules come from the policy file")
        options = BackendOptions(server=server, token_file=token_file, ca_file=ca_file, store=store,
                                 policy_path=policy_path)
        try:
            records = open_backend(options, policy=policy).record_view()
        except BackendError as exc:
            raise click.UsageError(str(exc)) from exc
    report = check_mod.run(list(paths), policy, environment, records)
    if output is Output.JSON:
        click.echo(json.dumps({
            "checked": report.checked,
            "denied": report.denied,
            "findings": [{"where": w, "reason": str(f.reason), "line": f.line, "object": f.subject,
                          "field": f.field_path, "container": f.container, "image": f.image}
                         for w, f in report.findings],
            "warnings": [{"where": w, "line": line} for w, line in report.warnings],
            "errors": report.errors,
            "skipped": report.skipped,
        }, indent=2, sort_keys=False))
    else:
        for where, finding in report.findings:
            click.echo(f"{finding.line}  ({where})")
        for where, line in report.warnings:
            click.echo(f"warning: {line}  ({where})", err=True)
        for line in report.skipped:
            click.echo(f"note: {line}", err=True)
        for line in report.errors:
            click.echo(f"error: {line}", err=True)
        if not report.errors:
            summary = (f"{report.checked} workload(s) checked, {report.denied} would be denied"
                       if report.checked else "no workloads found")
            click.echo(summary, err=True)
    sys.exit(report.exit_code)
