"""``promotion-gate operator``: reconcile Promotion objects into the store and keep the webhook's TLS valid.

Every input is read and checked here, once, before kopf starts; the operator then gets one
:class:`webhook.operator.kopf_app.OperatorConfig`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

from webhook import key_files, policy_file
from webhook.cli.options import policy_option, store_option
from webhook.core import keys
from webhook.core.policy import Policy
from webhook.operator import audit_anchor
from webhook.operator import certificates as tls_rotation
from webhook.store import SqlStore, StoreError, StoreUnavailable
from webhook.store import open_store as open_sql_store

if TYPE_CHECKING:  # the operator's kopf module: only when the command runs, not for --help
    from webhook.cluster_access import KubeAccess

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "promotion-gate"
# A namespace name, or a kopf pattern: globs (payments-*) and exclusions (!kube-*).
NAMESPACE_PATTERN = re.compile(r"^!?[a-z0-9*?]([a-z0-9*?-]{0,61}[a-z0-9*?])?$")
DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")

log = logging.getLogger("promotion_gate.operator")


def parse_namespace_scope(value: str) -> tuple[str, ...]:
    """``all`` -> () (cluster-wide); otherwise the comma-separated namespaces or patterns."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if items == ["all"]:
        return ()
    if not items:
        raise click.BadParameter('give "all" or a comma-separated list of namespaces', param_hint="--namespace-scope")
    for item in items:
        if item == "all":
            raise click.BadParameter('"all" cannot be combined with namespaces', param_hint="--namespace-scope")
        if not NAMESPACE_PATTERN.fullmatch(item):
            raise click.BadParameter(f'"{item}" is not a namespace name or pattern (e.g. payments-prod, payments-*)',
                                     param_hint="--namespace-scope")
    return tuple(items)


def own_namespace(option: str | None, service_account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    if option:
        return option
    try:
        found = service_account_file.read_text().strip()
    except OSError:
        found = ""
    return found or DEFAULT_NAMESPACE


def kube_access(kubeconfig: str | None, environ: Mapping[str, str]) -> KubeAccess:
    """--kubeconfig, else $KUBECONFIG, else the pod's service account in a cluster, else ~/.kube/config."""
    from webhook.cluster_access import resolve

    return resolve(kubeconfig, environ)


def load_policy(path: Path) -> Policy:
    try:
        loaded = policy_file.load(path)
    except policy_file.PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="--policy") from exc
    if not loaded.environments:
        raise click.BadParameter(f"{path}: the policy defines no environments to promote to (environments[])",
                                 param_hint="--policy")
    return loaded


def load_key(path: Path | None, policy: Policy) -> keys.SigningKey | None:
    if path is None:
        log.warning("no --key: only Promotions with a pre-signed spec.envelope can be recorded")
        return None
    try:
        signer = key_files.load_signing_key(path)
    except keys.InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from exc
    trusting = [e.name for e in policy.environments if signer.key_id in e.trusted_key_ids]
    if not trusting:
        log.warning("the operator key %s is trusted by no environment of the policy: Promotions without "
                    "spec.envelope will be rejected (list its public key under keys and trustedKeys)",
                    signer.key_id[:12])
    else:
        log.info("the operator key %s is trusted by: %s", signer.key_id[:12], ", ".join(trusting))
    return signer


def open_store(url: str) -> SqlStore:
    try:
        store = open_sql_store(url)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    try:
        store.migrate()
    except StoreUnavailable as exc:
        # Certificates do not need the store: keep going; Promotions stay Pending until it answers.
        log.warning("the store is unavailable (%s); Promotions stay Pending until it answers", exc)
    except StoreError as exc:
        raise click.ClickException(f"store: {exc}") from exc
    return store


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f'"{value}" is not HOST:PORT (e.g. 0.0.0.0:9102)', param_hint="--metrics-address")
    return host.strip("[]"), int(port)


def certificate_settings(manage: bool, namespace: str, secret: str, service: str,
                         webhook_config: str) -> tls_rotation.CertificateSettings | None:
    if not manage:
        return None
    for hint, value in (("--tls-secret", secret), ("--service", service), ("--webhook-config", webhook_config),
                        ("--namespace", namespace)):
        if not DNS_NAME.fullmatch(value):
            raise click.BadParameter(f'"{value}" is not a Kubernetes object name', param_hint=hint)
    return tls_rotation.CertificateSettings(namespace=namespace, secret_name=secret, service=service,
                                            webhook_config=webhook_config)


def anchor_settings(name: str | None, namespace: str, policy: Policy,
                    interval: float) -> audit_anchor.AnchorSettings | None:
    if name is None:
        return None
    if not DNS_NAME.match(name):
        raise click.BadParameter(f'"{name}" is not a Kubernetes object name', param_hint="--audit-anchor")
    if not policy.audit_checkpoint_keys:
        raise click.BadParameter("the policy names no audit.checkpointKeys: the public keys whose signed checkpoints "
                                 "the anchor keeps", param_hint="--audit-anchor")
    return audit_anchor.AnchorSettings(namespace, name, policy.audit_checkpoint_keys, interval)


@click.command("operator")
@store_option(required=True)
@policy_option(required=True, help="Policy file: environments, trusted keys, rules [env: PROMOTION_GATE_POLICY].")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="PROMOTION_GATE_OPERATOR_KEY",
              help="Private key the operator signs records with [env: PROMOTION_GATE_OPERATOR_KEY]. "
                   "Without it only Promotions carrying spec.envelope are recorded.")
@click.option("--namespace-scope", default="all", show_default=True,
              help='Where to watch Promotions: "all" or comma-separated namespaces/patterns.')
@click.option("--manage-certificates", is_flag=True,
              help="Create and renew the webhook's CA and serving certificate and sync caBundle.")
@click.option("--webhook-config", default="promotion-gate", show_default=True,
              help="ValidatingWebhookConfiguration whose caBundle to keep in sync.")
@click.option("--tls-secret", default="promotion-gate-tls", show_default=True,
              help="Secret (in --namespace) holding ca.crt, ca.key, tls.crt, tls.key.")
@click.option("--service", default="promotion-gate", show_default=True,
              help="The webhook Service: the certificate names <service>.<namespace>.svc.")
@click.option("--namespace", "namespace", envvar="POD_NAMESPACE",
              help="The operator's own namespace [env: POD_NAMESPACE; default: the service account's "
                   f"namespace, else {DEFAULT_NAMESPACE}].")
@click.option("--certificate-check-interval", type=click.FloatRange(min=1.0), show_default=True,
              default=tls_rotation.CHECK_INTERVAL_SECONDS, help="Seconds between certificate checks.")
@click.option("--peering/--standalone", default=False, show_default=True,
              help="kopf peering between replicas (needs kopf's peering CRDs); run ONE replica standalone.")
@click.option("--liveness", "liveness_endpoint", metavar="URL",
              help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.")
@click.option("--audit-anchor", "audit_anchor_name", metavar="NAME",
              help="Keep the newest signed audit checkpoint in this ConfigMap (in --namespace), checked against the "
                   "store; needs audit.checkpointKeys in the policy.")
@click.option("--audit-anchor-interval", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="Seconds between checks of the audit log against its anchor.")
@click.option("--kubeconfig", help="kubeconfig file [default: $KUBECONFIG, in a pod its service account, "
                                   "else ~/.kube/config].")
@click.option("--scan/--no-scan", "scan", default=False, show_default=True,
              help="Keep a live answer to what runs unpromoted: PolicyReports, a gauge, Events on revocation.")
@click.option("--scan-interval", type=click.FloatRange(min=10.0), default=300.0, show_default=True,
              help="Seconds between full rescans (a record or policy change rescans at once).")
@click.option("--scan-settle", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="After cluster changes, at most one rescan per this many seconds.")
@click.option("--record-poll", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between checks of the store's record version and of the policy file.")
@click.option("--policy-reports/--no-policy-reports", default=True, show_default=True,
              help="Write a wgpolicyk8s.io/v1alpha2 PolicyReport per namespace.")
@click.option("--revocation-events/--no-revocation-events", default=True, show_default=True,
              help="Post an Event on each workload a revocation makes non-compliant.")
@click.option("--request-timeout", type=click.FloatRange(1.0, 300.0), default=30.0, show_default=True,
              help="Seconds each request of the scan to the API server may take.")
@click.option("--metrics-address", metavar="HOST:PORT", default="",
              help="Serve the scan metrics (Prometheus), e.g. 0.0.0.0:9102.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator_command(store: str, policy_path: Path, key_path: Path | None, namespace_scope: str,
                     manage_certificates: bool, webhook_config: str, tls_secret: str, service: str,
                     namespace: str | None, certificate_check_interval: float, peering: bool,
                     liveness_endpoint: str | None, audit_anchor_name: str | None, audit_anchor_interval: float,
                     kubeconfig: str | None, scan: bool, scan_interval: float,
                     scan_settle: float, record_poll: float, policy_reports: bool, revocation_events: bool,
                     request_timeout: float, metrics_address: str, verbose: bool) -> None:
    """Record Promotion objects as signed promotion records; keep the webhook's certificate valid.

    Run a single replica: every Promotion is handled by one operator (see docs/operator.md).
    """
    from webhook.ledger import Ledger
    from webhook.operator import kopf_app as operator_mod

    operator_mod.configure_logging(verbose)
    namespaces = parse_namespace_scope(namespace_scope)
    policy = load_policy(policy_path)
    signer = load_key(key_path, policy)
    certificates = certificate_settings(manage_certificates, own_namespace(namespace), tls_secret, service,
                                        webhook_config)
    anchor = anchor_settings(audit_anchor_name, own_namespace(namespace), policy, audit_anchor_interval)
    access = kube_access(kubeconfig, os.environ)
    try:
        access.client_configuration()
    except Exception as exc:  # the client raises ConfigException, OSError, ValueError, ...
        raise click.ClickException(f"cannot configure the Kubernetes client from {access.describe()}: {exc}") from exc
    scanning = None
    if scan:
        from webhook.operator.scanner import ScanSettings

        scanning = ScanSettings(interval=scan_interval, settle=scan_settle, record_poll=record_poll,
                                policy_path=policy_path, policy_reports=policy_reports, events=revocation_events,
                                request_timeout=request_timeout,
                                metrics_address=host_port(metrics_address) if metrics_address else None)
    sql_store = open_store(store)
    config = operator_mod.OperatorConfig(
        ledger=Ledger(sql_store, policy), signer=signer, kube=access, namespaces=namespaces, certificates=certificates,
        certificate_interval=certificate_check_interval, peering=peering, liveness_endpoint=liveness_endpoint,
        scan=scanning, anchor=anchor)
    try:
        operator_mod.run(config)
    finally:
        sql_store.close()
