"""``promotion-gate``: the command-line shell around the ledger, the decision log and the servers."""

from __future__ import annotations

import io
import sys

import click

from webhook.cli import audit, check, operator, pin, records, scan, server


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="promotion-gate")
def main() -> None:
    """Admit only image digests that were promoted to the target environment."""
    # Whatever a record or an event holds, printing it never fails: text that UTF-8 cannot carry (a lone
    # surrogate in a record stored long ago) is written as its escape.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


for command in (server.certs, check.check, server.serve, *records.COMMANDS, pin.pin, audit.audit_group,
                operator.operator_command, scan.scan_cmd):
    main.add_command(command)

__all__ = ["main"]
