"""``promotion-gate scan``: what runs in the cluster, judged against today's records and policy."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

import click

from webhook import cluster_access, scan
from webhook.cli.backend import BackendError, LocalBackend, open_backend
from webhook.cli.options import BackendOptions, ExitCode, backend_options, load_policy
from webhook.cluster_listing import PAGE_SIZE, REQUEST_TIMEOUT, ClusterError, Lister, NamespaceNotFound, now_rfc3339
from webhook.core.policy import Policy
from webhook.core.promotion import Lookup, NoRecords, Promotion, PromotionStatus, RecordView, Subject, TagSubject
from webhook.scan_records import BatchedRecordView
from webhook.store import StoreError

NAMESPACE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class AnsweringView:
    """The server's answers (``GET /api/v1/status``), once per digest and environment; no answer is an error.

    A scan reports what the records say; when they cannot be read it says so and exits 3 instead of
    reporting every image as ``store-unavailable``.
    """

    def __init__(self, inner: RecordView) -> None:
        self._inner = inner
        self._answers: dict[tuple[Subject, str], PromotionStatus] = {}

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        missing = [s for s in subjects if (s, environment) not in self._answers]
        if missing:
            for subject, status in self._inner.lookup(missing, [], environment).statuses.items():
                if status.state is Promotion.UNAVAILABLE:
                    raise BackendError(f"cannot read the records of {subject[0]}@{subject[1]}: {status.detail}")
                self._answers[(subject, environment)] = status
        return Lookup({s: self._answers[(s, environment)] for s in subjects})


def record_view(backend: BackendOptions, policy: Policy) -> RecordView:
    if not policy.environments:
        return NoRecords()  # digest-only: no record is ever read
    if not (backend.server or backend.store):
        raise click.UsageError("the policy declares environments, so the scan needs their records: give "
                               "--server URL or --store URL")
    opened = open_backend(backend, policy=policy)
    if isinstance(opened, LocalBackend):
        return BatchedRecordView(opened.ledger.store, policy)
    return AnsweringView(opened.record_view())


def lister(kubeconfig: str | None, request_timeout: float, page_size: int) -> Lister:
    access = cluster_access.resolve(kubeconfig, os.environ)
    try:
        client = access.api_client()
    except Exception as exc:  # the client raises ConfigException, OSError, ValueError, ...
        click.echo(f"error: cannot configure the Kubernetes client from {access.describe()}: {exc}", err=True)
        sys.exit(ExitCode.INPUT)
    return Lister(client, page_size=page_size, timeout=request_timeout)


@click.command("scan")
@click.option("--namespace", "-n", "namespaces", multiple=True,
              help="Only this namespace; repeatable (default: every namespace).")
@click.option("--kubeconfig", help="kubeconfig file [default: $KUBECONFIG, in a pod its service account, "
                                   "else ~/.kube/config].")
@click.option("--request-timeout", type=click.FloatRange(0.5, 300), default=REQUEST_TIMEOUT, show_default=True,
              help="Seconds each request to the API server may take.")
@click.option("--page-size", type=click.IntRange(10, 5000), default=PAGE_SIZE, show_default=True,
              help="Objects per list request.")
@backend_options
def scan_cmd(namespaces: tuple[str, ...], kubeconfig: str | None, request_timeout: float, page_size: int,
             backend: BackendOptions) -> None:
    """Judge every running Pod and workload with the admission rules against today's records.

    Reports each finding — namespace, workload, container, image, reason and the line a developer
    would get at admission — and changes nothing. Exit status: 0 when everything complies, 1 when
    anything does not, 2 for unusable input, 3 when the API server, the server or the store fails.
    """
    if backend.policy_path is None:
        raise click.UsageError("scan needs --policy: environments, exemptions and the namespace map come from "
                               "the policy file")
    for name in namespaces:
        if not NAMESPACE_NAME.match(name):
            raise click.BadParameter(f'"{name}" is not a namespace name', param_hint="--namespace")
    policy = load_policy(backend.policy_path, usage=True)
    records = record_view(backend, policy)
    try:
        inventory = lister(kubeconfig, request_timeout, page_size).inventory(tuple(dict.fromkeys(namespaces)))
    except NamespaceNotFound as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.INPUT)
    except ClusterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    try:
        report = scan.run(inventory, policy, records, observed_at=now_rfc3339())
    except StoreError as exc:
        raise BackendError(f"store: {exc}") from exc
    if backend.json:
        click.echo(json.dumps(scan.report_json(report), indent=2))
    else:
        for found in report.findings:
            click.echo(found.finding.line)
            click.echo(scan.detail_line(found))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if not backend.json:
        click.echo(scan.summary_line(report), err=True)
    sys.exit(report.exit_code)
