"""The Promotion operator (kopf): ``Promotion`` objects in, signed promotion records in the store, status out.

The decisions are plain functions of the object's spec, metadata and status plus the store, the policy
and the operator's key (:func:`reconcile`), so they are tested without a cluster; the kopf wiring
(:func:`build_registry`) only moves their result into ``status``. Configuration arrives once, as an
:class:`OperatorConfig`, and reaches the handlers through closures: nothing is read from globals or
the environment once the operator runs. docs/operator.md describes the behaviour and the trust model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from webhook import api, dsse, keys, records, references, tls_rotation
from webhook.policy import Policy
from webhook.store import SqlStore, StoreError

GROUP = "promotion-gate.io"
VERSION = "v1"
PLURAL = "promotions"
RECORDED = "Recorded"
REJECTED = "Rejected"
PENDING = "Pending"
# kopf's bookkeeping (handler progress) in annotations under our own prefix; its diff base in
# status.kopf, which the CRD preserves: spec.envelope can be up to 256 KiB, the limit of all
# annotations together.
STORAGE_PREFIX = "kopf.promotion-gate.io"
PEERING_NAME = "promotion-gate"
STORE_RETRY_SECONDS = 30.0
CERTIFICATE_RETRY_SECONDS = 30.0

log = logging.getLogger(__name__)


class SpecError(ValueError):
    """The Promotion's spec cannot become a record; the message names the field and the fix."""


@dataclass(frozen=True)
class KubeAccess:
    """How to reach the API server, resolved once at start-up: a kubeconfig, or the pod's service account."""

    kubeconfig: str | None  # None: in-cluster service account

    def describe(self) -> str:
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster service account"

    def client_configuration(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        if self.kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration,
                                    persist_config=False)
        return configuration

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(configuration=self.client_configuration())


@dataclass(frozen=True)
class OperatorConfig:
    store: SqlStore
    policy: Policy
    signer: keys.SigningKey | None  # None: only Promotions with a pre-signed spec.envelope are recorded
    kube: KubeAccess
    namespaces: tuple[str, ...] = ()  # () = every namespace
    certificates: tls_rotation.CertificateSettings | None = None
    certificate_interval: float = tls_rotation.CHECK_INTERVAL_SECONDS
    peering: bool = False
    liveness_endpoint: str | None = None
    store_retry: float = STORE_RETRY_SECONDS


# --- the decisions: plain functions -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the operator concluded for one generation of a Promotion; :meth:`status` is the patch."""

    phase: str
    reason: str
    generation: int | None
    record_id: str | None = None

    def status(self) -> dict[str, Any]:
        # recordId None removes a stale id (merge patch) when a later generation is rejected.
        return {"phase": self.phase, "reason": self.reason, "recordId": self.record_id,
                "observedGeneration": self.generation}


@dataclass(frozen=True)
class Submission:
    body: dict[str, Any]  # what api.submit takes: the envelope and what it must be about
    reference: str
    environment: str


def promoted_by(meta: Mapping[str, Any]) -> str:
    return f"kubernetes:{meta.get('namespace', '')}/{meta.get('name', '')}"


def parse_image(value: Any) -> references.ImageReference:
    if not isinstance(value, str) or not value.strip():
        raise SpecError("spec.image is required: the image to promote, pinned by digest "
                        "(repository@sha256:<digest>)")
    try:
        ref = references.parse(value)
    except references.InvalidReference as exc:
        raise SpecError(f'spec.image "{value}" is not a valid image reference: {exc}') from exc
    if ref.digest is None:
        problem = "is a tag, not a digest" if ref.tag else "has no digest"
        raise SpecError(f'spec.image "{value}" {problem}; a promotion is about one immutable build: use '
                        f"{ref.written_name}@sha256:<digest>")
    return ref


def _environment(value: Any, policy: Policy) -> str:
    if not isinstance(value, str) or not value:
        defined = ", ".join(policy.environment_names) or "none"
        raise SpecError(f"spec.environment is required: the environment to promote to (defined: {defined})")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where} must be an object")
    return value


def _text(source: Mapping[str, Any], key: str, where: str) -> str:
    value = source.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SpecError(f"{where}.{key} must be a string")
    return value


def _count(source: Mapping[str, Any], key: str, where: str) -> int:
    value = source.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{where}.{key} must be a non-negative integer")
    return value


def _reason(evidence_reason: str, meta: Mapping[str, Any]) -> str:
    # The uid ties the record to the object, and through it to the API server's audit log, which
    # names the user who created it. With the generation it also makes the payload deterministic.
    suffix = (f"(Promotion {meta.get('namespace', '')}/{meta.get('name', '')} uid {meta.get('uid', '')} "
              f"generation {meta.get('generation', '')})")
    if not evidence_reason:
        return suffix
    room = records.MAX_TEXT - len(suffix) - 1
    text = evidence_reason if len(evidence_reason) <= room else evidence_reason[: room - 1] + "…"
    return f"{text} {suffix}"


def build_record(spec: Mapping[str, Any], meta: Mapping[str, Any], policy: Policy) -> records.Record:
    """The record the operator signs for a Promotion without an envelope.

    Deterministic per object generation: promotedAt is the object's creationTimestamp and the reason
    names its uid and generation, so signing again after a restart yields the same payload, which the
    store recognises as a duplicate.
    """
    ref = parse_image(spec.get("image"))
    environment = _environment(spec.get("environment"), policy)
    evidence = _mapping(spec.get("evidence"), "spec.evidence")
    tests = None
    given = [k for k in ("testsPassed", "testsFailed") if evidence.get(k) is not None]
    if len(given) == 1:
        raise SpecError(f"spec.evidence: give both testsPassed and testsFailed, not only {given[0]}")
    if given:
        tests = records.Tests(_count(evidence, "testsPassed", "spec.evidence"),
                              _count(evidence, "testsFailed", "spec.evidence"))
    scan = None
    if evidence.get("scan") is not None:
        raw_scan = _mapping(evidence["scan"], "spec.evidence.scan")
        scan = records.Scan(_text(raw_scan, "scanner", "spec.evidence.scan"),
                            {s: _count(raw_scan, s, "spec.evidence.scan") for s in records.SEVERITIES
                             if raw_scan.get(s) is not None})
    approvers = evidence.get("approvers") or []
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise SpecError("spec.evidence.approvers must be a list of strings")
    created = meta.get("creationTimestamp")
    if not isinstance(created, str) or not created:
        raise SpecError("metadata.creationTimestamp is missing: the operator only records stored objects")
    previous = policy.previous_environment(environment)
    assert ref.digest is not None
    return records.Record(
        "promotion", ref.repository, ref.digest, environment, previous.name if previous else None,
        created, promoted_by(meta),
        records.Source(_text(evidence, "gitCommit", "spec.evidence"), _text(evidence, "gitRepository", "spec.evidence"),
                       _text(evidence, "ciRunId", "spec.evidence"), _text(evidence, "ciRunUrl", "spec.evidence")),
        tests, scan, tuple(approvers), _reason(_text(evidence, "reason", "spec.evidence"), meta))


def _given_envelope(raw: Any) -> dsse.Envelope:
    if not isinstance(raw, str):
        raise SpecError("spec.envelope must be a string holding the DSSE envelope JSON")
    try:
        envelope = dsse.parse(raw)
        record = records.parse_statement(envelope.payload)
    except (dsse.EnvelopeError, records.RecordError) as exc:
        raise SpecError(f"spec.envelope: malformed envelope: {exc}") from exc
    if record.kind != "promotion":
        raise SpecError("spec.envelope holds a revocation record; a Promotion carries a promotion record "
                        "(revoke with 'promotion-gate revoke')")
    return envelope


def submission(spec: Mapping[str, Any], meta: Mapping[str, Any], policy: Policy,
               signer: keys.SigningKey | None) -> Submission:
    """What to submit for this Promotion: its pre-signed envelope, or a record signed by the operator."""
    ref = parse_image(spec.get("image"))
    environment = _environment(spec.get("environment"), policy)
    if spec.get("envelope"):
        envelope = _given_envelope(spec["envelope"])
    elif signer is None:
        raise SpecError("spec.envelope is required: this operator has no signing key (--key), so it only "
                        "stores pre-signed envelopes")
    else:
        envelope = dsse.sign(records.payload(build_record(spec, meta, policy)), [signer])
    # The store refuses an envelope about anything else than the object says (a replayed envelope).
    expect = {"repository": ref.repository, "digest": ref.digest, "environment": environment}
    return Submission({"envelope": envelope.to_json(), "expect": expect}, f"{ref.repository}@{ref.digest}",
                      environment)


def already_recorded(meta: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return (status.get("phase") == RECORDED and bool(status.get("recordId"))
            and status.get("observedGeneration") == meta.get("generation"))


def reconcile(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any], *,
              store: SqlStore, policy: Policy, signer: keys.SigningKey | None) -> Outcome | None:
    """Record one Promotion; None when its status already says Recorded for this generation."""
    generation = meta.get("generation")
    generation = generation if isinstance(generation, int) else None
    if already_recorded(meta, status):
        return None
    try:
        planned = submission(spec, meta, policy, signer)
    except SpecError as exc:
        return Outcome(REJECTED, str(exc), generation)
    identity = promoted_by(meta)
    try:
        # Kubernetes RBAC on Promotion objects already decided who may write: every environment.
        code, payload = api.submit(store, policy, planned.body, identity, lambda _environment: True)
    except StoreError as exc:
        return Outcome(PENDING, f"store unavailable, will retry: {exc}", generation)
    if code == 201:
        return Outcome(RECORDED, f'{planned.reference} recorded for environment "{planned.environment}"',
                       generation, str(payload["id"]))
    if code == 409:
        return Outcome(RECORDED, f'{planned.reference} was already recorded for environment '
                                 f'"{planned.environment}"', generation, str(payload["id"]))
    return Outcome(REJECTED, str(payload.get("error", payload)), generation)


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
                            store=config.store, policy=config.policy, signer=config.signer)
        if outcome is None:
            logger.debug("already recorded for this generation; nothing to do")
            return
        patch.status.update(outcome.status())
        if outcome.phase == PENDING:
            # kopf applies the patch (phase Pending) and calls the handler again after the delay.
            raise kopf.TemporaryError(outcome.reason, delay=config.store_retry)
        if outcome.phase == REJECTED:
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

    return registry


def configure_logging(verbose: bool) -> None:
    kopf.configure(verbose=verbose)


def run(config: OperatorConfig) -> None:
    """Run the operator until SIGTERM/SIGINT."""
    log.info("promotion-gate operator: %s, namespaces %s, signing key %s, certificates %s",
             config.kube.describe(), ", ".join(config.namespaces) or "all",
             config.signer.key_id[:12] if config.signer else "none (envelopes only)",
             "managed" if config.certificates else "not managed")
    kopf.run(
        registry=build_registry(config),
        settings=build_settings(),
        standalone=not config.peering,
        peering_name=PEERING_NAME if config.peering else None,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
    )
