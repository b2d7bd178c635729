"""The Promotion operator (kopf): ``Promotion`` objects in, signed records in the store, status out.

The decisions are plain functions (:func:`webhook.operator.promotions.reconcile`), tested without a
cluster; the kopf wiring here (:func:`build_registry`) only moves their result into ``status``.
Configuration arrives once, as an :class:`OperatorConfig`, and reaches the handlers through closures:
nothing is read from globals or the environment once the operator runs. docs/operator.md describes
the behaviour and the trust model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from webhook.cluster_access import KubeAccess
from webhook.core import keys
from webhook.ledger import Ledger
from webhook.operator import audit_anchor
from webhook.operator import certificates as tls_rotation
from webhook.operator.promotions import Phase, reconcile
from webhook.operator.scanner import Scanner, ScanSettings

GROUP = "promotion-gate.io"
VERSION = "v1"
PLURAL = "promotions"
# kopf's bookkeeping (handler progress) in annotations under our own prefix; its diff base in
# status.kopf, which the CRD preserves: spec.envelope can be up to 256 KiB, the limit of all
# annotations together.
STORAGE_PREFIX = "kopf.promotion-gate.io"
PEERING_NAME = "promotion-gate"
STORE_RETRY_SECONDS = 30.0
CERTIFICATE_RETRY_SECONDS = 30.0

log = logging.getLogger("promotion_gate.operator")


@dataclass(frozen=True)
class OperatorConfig:
    ledger: Ledger
    signer: keys.SigningKey | None  # None: only Promotions with a pre-signed spec.envelope are recorded
    kube: KubeAccess
    namespaces: tuple[str, ...] = ()  # () = every namespace
    certificates: tls_rotation.CertificateSettings | None = None
    certificate_interval: float = tls_rotation.CHECK_INTERVAL_SECONDS
    peering: bool = False
    liveness_endpoint: str | None = None
    store_retry: float = STORE_RETRY_SECONDS
    anchor: audit_anchor.AnchorSettings | None = None  # None: no external anchor of the audit log
    scan: ScanSettings | None = None  # None: no scanning of what runs


# --- kopf wiring ------------------------------------------------------------------------------------


def connection_info(access: KubeAccess) -> kopf.ConnectionInfo:
    """kopf's credentials from the same source as the kubernetes client (read again at every login)."""
    configuration = access.client_configuration()
    header = (configuration.get_api_key_with_prefix("BearerToken")
              or configuration.get_api_key_with_prefix("authorization"))
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        username=configuration.username or None, password=configuration.password or None,
        scheme=scheme, token=token, certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file)


def build_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(name="kopf")
    settings.persistence.finalizer = f"{STORAGE_PREFIX}/finalizer"
    # Reconnect watches regularly: a silently dropped connection must not stall the operator.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.execution.max_workers = 4
    return settings


async def _check_certificates(certificates: tls_rotation.CertificateSettings, core: Any, admission: Any) -> bool:
    try:
        result = await asyncio.to_thread(tls_rotation.reconcile, core, admission, certificates)
    except Exception as exc:  # any failure: report it, keep the operator running, try again soon
        log.error("certificate check failed: %s; retrying in %.0fs", exc, CERTIFICATE_RETRY_SECONDS)
        return False
    level = logging.INFO if result.secret_written or result.webhooks_patched else logging.DEBUG
    if not result.webhook_config_found:
        level = logging.WARNING
    log.log(level, "certificates: %s", result.describe(certificates))
    return True


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """The operator's handlers, registered on a registry of their own (no import-time globals)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(config.kube)

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="record", registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="record", registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="record", field="spec", registry=registry)
    def promotion(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
        # No deletion handler on purpose: deleting a Promotion never touches the store (revocation
        # is an explicit, signed record), and without one kopf adds no finalizer to block deletion.
        outcome = reconcile(body.get("spec") or {}, body.get("metadata") or {}, body.get("status") or {},
                            records_ledger=config.ledger, signer=config.signer)
        if outcome is None:
            logger.debug("already recorded for this generation; nothing to do")
            return
        patch.status.update(outcome.status())
        if outcome.phase is Phase.PENDING:
            # kopf applies the patch (phase Pending) and calls the handler again after the delay.
            raise kopf.TemporaryError(outcome.reason, delay=config.store_retry)
        if outcome.phase is Phase.REJECTED:
            logger.warning("rejected: %s", outcome.reason)
        else:
            logger.info("%s (record %s)", outcome.reason, outcome.record_id)

    certificates = config.certificates
    if certificates is not None:
        tasks: list[asyncio.Task[None]] = []
        clients: list[Any] = []

        async def keep_certificates(core: Any, admission: Any, healthy: bool) -> None:
            while True:
                await asyncio.sleep(config.certificate_interval if healthy else CERTIFICATE_RETRY_SECONDS)
                healthy = await _check_certificates(certificates, core, admission)

        @kopf.on.startup(id="certificates", registry=registry)
        async def start_certificates(**_: Any) -> None:
            # kopf timers belong to watched objects; this check is for the whole installation and
            # needs only get/create/update by name, so it is a task owned by the operator's lifecycle.
            # The first check runs here, before Promotions are watched: webhook pods wait for the Secret.
            from kubernetes import client

            api_client = await asyncio.to_thread(config.kube.api_client)
            clients.append(api_client)
            core, admission = client.CoreV1Api(api_client), client.AdmissionregistrationV1Api(api_client)
            healthy = await _check_certificates(certificates, core, admission)
            tasks.append(asyncio.create_task(keep_certificates(core, admission, healthy), name="certificates"))

        @kopf.on.cleanup(id="certificates", registry=registry)
        async def stop_certificates(**_: Any) -> None:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for api_client in clients:
                api_client.close()

    scan_settings = config.scan
    if scan_settings is not None:
        scanners: list[Scanner] = []

        @kopf.on.startup(id="scanner", registry=registry)
        async def start_scanner(**_: Any) -> None:
            # Like the certificate task, the scanner belongs to the whole installation, not to one object:
            # its own list+watch caches and thread, started and stopped with the operator.
            scanner = Scanner(scan_settings, config.ledger.policy, config.ledger.store, config.kube)
            try:
                await asyncio.to_thread(scanner.start)
            except OSError as exc:  # a metrics address in use or not ours: retrying would not help
                raise kopf.PermanentError(f"cannot serve the scan metrics on {scan_settings.metrics_address}: "
                                          f"{exc}") from exc
            scanners.append(scanner)

        @kopf.on.cleanup(id="scanner", registry=registry)
        async def stop_scanner(**_: Any) -> None:
            for scanner in scanners:
                await asyncio.to_thread(scanner.stop)

    anchor = config.anchor
    if anchor is not None:
        _keep_audit_anchor(registry, config, anchor)

    return registry


def _keep_audit_anchor(registry: kopf.OperatorRegistry, config: OperatorConfig,
                       anchor: audit_anchor.AnchorSettings) -> None:
    """Every ``anchor.interval`` seconds: check the log against the anchor and move it forward."""
    tasks: list[asyncio.Task[None]] = []
    clients: list[Any] = []

    async def keep(core: Any) -> None:
        while True:
            try:
                await asyncio.to_thread(audit_anchor.reconcile, core, config.ledger.store, anchor)
            except Exception as exc:  # the store or the API server failed: report it, keep going
                log.error("audit anchor check failed: %s; retrying in %.0fs", exc, anchor.interval)
            await asyncio.sleep(anchor.interval)

    @kopf.on.startup(id="audit-anchor", registry=registry)
    async def start_anchor(**_: Any) -> None:
        from kubernetes import client

        api_client = await asyncio.to_thread(config.kube.api_client)
        clients.append(api_client)
        tasks.append(asyncio.create_task(keep(client.CoreV1Api(api_client)), name="audit-anchor"))

    @kopf.on.cleanup(id="audit-anchor", registry=registry)
    async def stop_anchor(**_: Any) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for api_client in clients:
            api_client.close()


def configure_logging(verbose: bool) -> None:
    kopf.configure(verbose=verbose)


def run(config: OperatorConfig) -> None:
    """Run the operator until SIGTERM/SIGINT."""
    log.info("promotion-gate operator: %s, namespaces %s, signing key %s, certificates %s, scan %s, audit anchor %s",
             config.kube.describe(), ", ".join(config.namespaces) or "all",
             config.signer.key_id[:12] if config.signer else "none (envelopes only)",
             "managed" if config.certificates else "not managed",
             f"every {config.scan.interval:g}s and on every record or policy change" if config.scan else "off",
             f"ConfigMap {config.anchor.namespace}/{config.anchor.configmap}" if config.anchor else "none")
    kopf.run(
        registry=build_registry(config),
        settings=build_settings(),
        standalone=not config.peering,
        peering_name=PEERING_NAME if config.peering else None,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
    )
