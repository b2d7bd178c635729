"""``promotion-gate certs`` and ``promotion-gate serve``: run the admission webhook."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from webhook import certs as certs_mod
from webhook.cli.options import load_policy, policy_option, store_option


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
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--baseline-endpoint", is_flag=True, hidden=True, help="Expose /baseline/allow for benchmarks.")
def serve(policy_path: Path | None, bind: str, cert_dir: Path, dev_certs: bool, store: str | None,
          server_key: Path | None, use_kubernetes: bool | None, running_lookup: bool | None, workers: int, threads: int,
          baseline_endpoint: bool) -> None:
    """Serve the admission webhook (and the record API) over HTTPS."""
    from webhook.server import serving, wiring

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
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    kubernetes = use_kubernetes if use_kubernetes is not None else (in_cluster or policy.watch_namespaces)
    lookup = None
    if running_lookup if running_lookup is not None else kubernetes:
        from webhook.cluster_access import KubeAccess, resolve

        lookup = KubeAccess(None) if in_cluster else resolve(None, os.environ)
    settings = wiring.Settings(
        policy=policy, store_url=store, server_key=server_key, use_kubernetes=kubernetes,
        in_cluster=in_cluster, running_lookup=lookup, enable_baseline=baseline_endpoint)
    try:
        wiring.preflight(settings)
    except wiring.StartupError as exc:
        raise click.ClickException(str(exc)) from exc
    options = serving.ServerOptions(bind=bind, certfile=certfile, keyfile=keyfile, workers=workers,
                                    threads=threads)
    click.echo(f"promotion-gate serving https://{bind}/validate (policy {policy_path or 'built-in default'}, "
               f"store {wiring.describe_store(store)})", err=True)
    serving.GunicornServer(options, lambda: wiring.build_app(settings)).run()
