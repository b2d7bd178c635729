"""``promotion-gate certs`` and ``promotion-gate serve``: run the admission webhook."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from webhook import certs as certs_mod
from webhook import metrics as metrics_mod
from webhook.cli.options import load_policy, policy_option, store_option
from webhook.server.connections import Limits

LIMITS = Limits()


@click.command("certs")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("var/certs"),
              show_default=True, help="Where to write ca.crt, tls.crt and tls.key.")
@click.option("--host", "hosts", multiple=True, default=certs_mod.DEFAULT_HOSTS, show_default=True,
              help="Subject alternative name (IP or DNS); repeat for several.")
@click.option("--force", is_flag=True, help="Replace existing certificates.")
def certs(directory: Path, hosts: tuple[str, ...], force: bool) -> None:
    """Generate a development CA and a serving certificate (kept if present)."""
    ca, crt, key = certs_mod.ensure_dev_certificates(directory, tuple(hosts), force=force)
    click.echo(f"CA certificate:      {ca}\nserving certificate: {crt}\nserving key:         {key}")


@click.command("serve")
@policy_option()
@click.option("--bind", default="127.0.0.1:8443", show_default=True, help="Address to listen on.")
@click.option("--cert-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/certs"),
              show_default=True, help="Directory with tls.crt and tls.key.")
@click.option("--dev-certs", is_flag=True, help="Generate a development CA and certificate if missing.")
@store_option(help="sqlite:///path or postgresql://… [env: PROMOTION_GATE_STORE]; none: digest-only.")
@click.option("--server-key", type=click.Path(dir_okay=False, path_type=Path), envvar="PROMOTION_GATE_SERVER_KEY",
              help="Signing key for audit checkpoints [env: PROMOTION_GATE_SERVER_KEY].")
@click.option("--kubernetes/--no-kubernetes", "use_kubernetes", default=None,
              help="Read namespace labels from the Kubernetes API (default: when running in a cluster).")
@click.option("--running-lookup/--no-running-lookup", "running_lookup", default=None,
              help="List Pods to answer GET /api/v1/running/<digest> (trace) (default: with --kubernetes).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes; each waits on its connections in one event loop.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Threads per worker that answer complete requests.")
@click.option("--max-connections", default=LIMITS.max_connections, show_default=True,
              type=click.IntRange(1, 100_000), help="Open connections per worker.")
@click.option("--max-connections-per-address", default=LIMITS.max_connections_per_address, show_default=True,
              type=click.IntRange(1, 100_000), help="Open connections per client address, per worker.")
@click.option("--body-memory", default=LIMITS.body_memory_bytes // 2**20, show_default=True,
              type=click.IntRange(8, 65536),
              help="MiB of request bodies a worker holds at once; the oldest body still arriving makes room.")
@click.option("--handshake-timeout", default=LIMITS.handshake_timeout, show_default=True,
              type=click.FloatRange(0.1, 300), help="Seconds a client has to complete the TLS handshake.")
@click.option("--header-timeout", default=LIMITS.header_timeout, show_default=True,
              type=click.FloatRange(0.1, 300), help="Seconds a client has to send a request's line and headers.")
@click.option("--body-timeout", default=LIMITS.body_timeout, show_default=True,
              type=click.FloatRange(0.1, 300), help="Seconds a client has to send a request's body.")
@click.option("--keepalive-timeout", default=LIMITS.keepalive_timeout, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Seconds an idle connection stays open between requests.")
@click.option("--validate-client-ca", type=click.Path(dir_okay=False, path_type=Path),
              envvar="PROMOTION_GATE_VALIDATE_CLIENT_CA",
              help="PEM CA bundle: /validate then answers only clients with a certificate it signed (the API "
                   "server, through its AdmissionConfiguration) [env: PROMOTION_GATE_VALIDATE_CLIENT_CA].")
@click.option("--validate-client-name", "validate_client_names", multiple=True,
              help="With --validate-client-ca: the certificate's common name or a DNS name must be one of "
                   "these; repeat for several.")
@click.option("--baseline-endpoint", is_flag=True, hidden=True, help="Expose /baseline/allow for benchmarks.")
def serve(policy_path: Path | None, bind: str, cert_dir: Path, dev_certs: bool, store: str | None,
          server_key: Path | None, use_kubernetes: bool | None, running_lookup: bool | None, workers: int,
          threads: int,
          max_connections: int, max_connections_per_address: int, body_memory: int, handshake_timeout: float,
          header_timeout: float, body_timeout: float, keepalive_timeout: float,
          validate_client_ca: Path | None, validate_client_names: tuple[str, ...],
          baseline_endpoint: bool) -> None:
    """Serve the admission webhook (and the record API) over HTTPS."""
    from webhook.server import serving, wiring
    from webhook.server.app import ValidateClients
    from webhook.server.tls import TlsFiles

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
    if validate_client_names and validate_client_ca is None:
        raise click.ClickException("--validate-client-name needs --validate-client-ca")
    if validate_client_ca is not None and not validate_client_ca.is_file():
        raise click.ClickException(f"--validate-client-ca: {validate_client_ca} not found")
    try:
        serving.parse_bind(bind)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    kubernetes = use_kubernetes if use_kubernetes is not None else (in_cluster or policy.watch_namespaces)
    lookup = None
    if running_lookup if running_lookup is not None else kubernetes:
        from webhook.cluster_access import KubeAccess, resolve

        lookup = KubeAccess(None) if in_cluster else resolve(None, os.environ)
    settings = wiring.Settings(
        policy=policy, store_url=store, server_key=server_key, use_kubernetes=kubernetes,
        in_cluster=in_cluster, running_lookup=lookup, enable_baseline=baseline_endpoint,
        validate_clients=ValidateClients(required=validate_client_ca is not None,
                                                names=frozenset(validate_client_names)))
    tls = TlsFiles(certfile=certfile, keyfile=keyfile, client_ca=validate_client_ca)
    try:
        wiring.preflight(settings)
        wiring.check_tls(tls)
    except wiring.StartupError as exc:
        raise click.ClickException(str(exc)) from exc
    limits = replace(LIMITS, max_connections=max_connections, max_connections_per_address=max_connections_per_address,
                     body_memory_bytes=body_memory * 2**20,
                     handshake_timeout=handshake_timeout, header_timeout=header_timeout, body_timeout=body_timeout,
                     keepalive_timeout=keepalive_timeout)
    options = serving.ServerOptions(bind=bind, tls=tls, workers=workers, threads=threads, limits=limits)
    client_auth = f", /validate needs a client certificate from {validate_client_ca}" if validate_client_ca else ""
    click.echo(f"promotion-gate serving https://{bind}/validate (policy {policy_path or 'built-in default'}, "
               f"store {wiring.describe_store(store)}{client_auth})", err=True)
    if workers > 1 or os.environ.get(metrics_mod.MULTIPROCESS_ENV):
        # One set of counters for the pod, whichever worker a scrape reaches (docs/metrics.md); a
        # directory given in the environment is cleared of an earlier run's counts either way.
        shared = os.environ.get(metrics_mod.MULTIPROCESS_ENV) or tempfile.mkdtemp(prefix="promotion-gate-metrics-")
        metrics_mod.share_between_workers(Path(shared))
    serving.serve(options, lambda: wiring.build_served(settings), worker_exited=metrics_mod.worker_stopped)
