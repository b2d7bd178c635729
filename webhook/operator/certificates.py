"""The webhook's TLS certificate, managed by the operator (``promotion-gate operator --manage-certificates``).

One Secret (type ``kubernetes.io/tls``) holds a CA (``ca.crt``, ``ca.key``) and a serving certificate
for the webhook Service (``tls.crt``, ``tls.key``); every webhook of the ValidatingWebhookConfiguration
carries ``ca.crt`` as its ``caBundle``. :func:`plan` decides what to do from the Secret's data, the
current bundles and the time, without any I/O; :func:`reconcile` reads, applies the plan and writes.

Rotation never opens a window in which the API server and the webhook disagree: a renewed serving
certificate is signed by the same CA, and a new CA is published next to the old one (``ca.crt`` holds
both while the old one is valid) so pods still serving the old certificate stay trusted until the
kubelet has refreshed their Secret volume.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from webhook import certs

SECRET_TYPE = "kubernetes.io/tls"
SECRET_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")
CA_DAYS = 3650
SERVING_DAYS = 90
# Renew when less than a third of a certificate's validity is left: 30 days for a 90-day serving
# certificate, many check intervals and kubelet volume refreshes before it could expire.
RENEW_WHEN_REMAINING = 1 / 3
CHECK_INTERVAL_SECONDS = 600.0
MANAGED_BY = "promotion-gate-operator"
EXPIRES_ANNOTATION = "promotion-gate.io/serving-certificate-not-after"

log = logging.getLogger("promotion_gate.certificates")


@dataclass(frozen=True)
class CertificateSettings:
    """Which Secret and webhook configuration to keep valid, read once from the command line."""

    namespace: str
    secret_name: str
    service: str
    webhook_config: str
    ca_days: int = CA_DAYS
    serving_days: int = SERVING_DAYS

    @property
    def hosts(self) -> tuple[str, ...]:
        """DNS names the API server may use for the Service (it dials ``<service>.<namespace>.svc``)."""
        short = f"{self.service}.{self.namespace}.svc"
        return (short, f"{short}.cluster.local")


class SecretAction(enum.StrEnum):
    KEEP = "keep"
    CREATE = "create"  # no usable CA: a new CA and a new serving certificate
    RENEW_SERVING = "renew-serving"  # same CA, new serving certificate
    ROTATE_CA = "rotate-ca"  # new CA (the old one stays in ca.crt while valid) and serving certificate


@dataclass(frozen=True)
class Plan:
    action: SecretAction
    reason: str
    patch_ca_bundle: bool  # some webhook's caBundle is not (or, after the action, will not be) ca.crt

    @property
    def changes_ca(self) -> bool:
        return self.action in (SecretAction.CREATE, SecretAction.ROTATE_CA)


def _renewal_due(cert: x509.Certificate, now: dt.datetime) -> bool:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * RENEW_WHEN_REMAINING


def _same_key(private: Any, cert: x509.Certificate) -> bool:
    def spki(public: Any) -> bytes:
        return bytes(public.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))

    return spki(private.public_key()) == spki(cert.public_key())


def _dns_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName))


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def decide_secret(data: Mapping[str, bytes] | None, hosts: Sequence[str], now: dt.datetime) -> tuple[SecretAction, str]:
    """What the Secret needs, and why (the reason is logged)."""
    if data is None:
        return SecretAction.CREATE, "the Secret does not exist"
    missing = [key for key in SECRET_KEYS if not data.get(key)]
    if missing:
        return SecretAction.CREATE, f"the Secret lacks {', '.join(missing)}"
    try:
        ca = x509.load_pem_x509_certificates(data["ca.crt"])[0]
        ca_key = serialization.load_pem_private_key(data["ca.key"], password=None)
        serving = x509.load_pem_x509_certificate(data["tls.crt"])
        serving_key = serialization.load_pem_private_key(data["tls.key"], password=None)
    except (ValueError, TypeError) as exc:
        return SecretAction.CREATE, f"the Secret holds an unreadable certificate or key ({exc})"
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not _same_key(ca_key, ca):
        return SecretAction.CREATE, "ca.key is not the ECDSA key of the first certificate in ca.crt"
    if _renewal_due(ca, now):
        return SecretAction.ROTATE_CA, f"the CA expires {_when(ca.not_valid_after_utc)}"
    if not _same_key(serving_key, serving):
        return SecretAction.RENEW_SERVING, "tls.key does not belong to tls.crt"
    try:
        serving.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return SecretAction.RENEW_SERVING, "tls.crt is not signed by the CA in ca.crt"
    absent = [host for host in hosts if host not in _dns_names(serving)]
    if absent:
        return SecretAction.RENEW_SERVING, f"tls.crt does not name {', '.join(absent)}"
    if _renewal_due(serving, now):
        return SecretAction.RENEW_SERVING, (f"the serving certificate expires {_when(serving.not_valid_after_utc)}, "
                                            "less than a third of its validity left")
    return SecretAction.KEEP, f"the serving certificate is valid until {_when(serving.not_valid_after_utc)}"


def plan(data: Mapping[str, bytes] | None, ca_bundles: Sequence[bytes] | None, hosts: Sequence[str],
         now: dt.datetime) -> Plan:
    """Decide from the Secret's data and the webhooks' current ``caBundle`` values (None: no configuration)."""
    action, reason = decide_secret(data, hosts, now)
    if ca_bundles is None or not ca_bundles:
        patch = False
    elif action in (SecretAction.CREATE, SecretAction.ROTATE_CA):
        patch = True
    else:
        assert data is not None
        patch = any(bundle != data["ca.crt"] for bundle in ca_bundles)
    return Plan(action, reason, patch)


def _common_name(text: str, *, fallback: str = "promotion-gate") -> str:
    # X.509 limits a common name to 64 characters; a Service name plus a namespace can be longer. Clients
    # match the subject alternative names, so the common name is only a label.
    return text if len(text) <= 64 else fallback[:64]


def material(action: SecretAction, data: Mapping[str, bytes] | None, settings: CertificateSettings,
             now: dt.datetime) -> dict[str, bytes]:
    """The Secret's new data for ``action`` (generates keys; everything else is kept)."""
    if action is SecretAction.KEEP:
        assert data is not None
        return dict(data)
    kept = {k: v for k, v in (data or {}).items() if k not in SECRET_KEYS}
    if action is SecretAction.RENEW_SERVING:
        assert data is not None
        bundle, ca_key = data["ca.crt"], data["ca.key"]
    else:
        ca_pem, ca_key = certs.new_ca(_common_name(f"{settings.service} webhook CA"), days=settings.ca_days)
        bundle = ca_pem
        if action is SecretAction.ROTATE_CA and data is not None:
            # Keep trusting the old CA while pods may still serve certificates it signed.
            for old in x509.load_pem_x509_certificates(data["ca.crt"]):
                if old.not_valid_after_utc > now:
                    bundle += old.public_bytes(serialization.Encoding.PEM)
    signing_ca = x509.load_pem_x509_certificates(bundle)[0].public_bytes(serialization.Encoding.PEM)
    cert_pem, key_pem = certs.issue(signing_ca, ca_key, settings.hosts, days=settings.serving_days,
                                    common_name=_common_name(settings.hosts[0], fallback=settings.service))
    return {**kept, "ca.crt": bundle, "ca.key": ca_key, "tls.crt": cert_pem, "tls.key": key_pem}


# --- Kubernetes I/O (thin) --------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationResult:
    plan: Plan
    secret_written: bool
    webhooks_patched: int
    webhook_config_found: bool

    def describe(self, settings: CertificateSettings) -> str:
        secret = f"Secret {settings.namespace}/{settings.secret_name}"
        done = {SecretAction.KEEP: f"{secret} kept", SecretAction.CREATE: f"{secret} written with a new CA",
                SecretAction.RENEW_SERVING: f"{secret}: serving certificate renewed",
                SecretAction.ROTATE_CA: f"{secret}: CA rotated"}[self.plan.action]
        if not self.webhook_config_found:
            bundles = (f"ValidatingWebhookConfiguration {settings.webhook_config} not found, "
                       "caBundle not synced")
        elif self.webhooks_patched:
            bundles = f"caBundle updated in {self.webhooks_patched} webhook(s) of {settings.webhook_config}"
        else:
            bundles = f"caBundle of {settings.webhook_config} in sync"
        return f"{done} ({self.plan.reason}); {bundles}"


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _read_json(call: Any, *args: Any) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        response = call(*args, _preload_content=False)
    except ApiException as exc:
        if _status(exc) == 404:
            return None
        raise
    document: dict[str, Any] = json.loads(response.data)
    return document


def _decode(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in data.items()}


def _serving_not_after(data: Mapping[str, bytes]) -> str:
    return _when(x509.load_pem_x509_certificate(data["tls.crt"]).not_valid_after_utc)


def _write_secret(core: Any, settings: CertificateSettings, existing: dict[str, Any] | None,
                  data: Mapping[str, bytes]) -> None:
    annotations = {EXPIRES_ANNOTATION: _serving_not_after(data)}
    if existing is None:
        core.create_namespaced_secret(settings.namespace, {
            "apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
            "metadata": {"name": settings.secret_name, "namespace": settings.namespace,
                         "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                         "annotations": annotations},
            "data": _encode(data),
        })
        return
    # Replace with the resourceVersion we read: a concurrent writer makes this fail (409) and the next
    # check starts again from what is really there.
    metadata = existing.setdefault("metadata", {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **annotations}
    existing["data"] = _encode(data)
    if existing.get("type") != SECRET_TYPE:
        log.warning("Secret %s/%s has type %s, not %s; keeping its type", settings.namespace,
                    settings.secret_name, existing.get("type"), SECRET_TYPE)
    core.replace_namespaced_secret(settings.secret_name, settings.namespace, existing)


def reconcile(core: Any, admission: Any, settings: CertificateSettings, *,
              now: dt.datetime | None = None) -> RotationResult:
    """One check: ensure the Secret, renew or rotate as :func:`plan` says, sync every ``caBundle``.

    ``core`` is a ``CoreV1Api``, ``admission`` an ``AdmissionregistrationV1Api``. Needs get/create/update
    on the Secret and get/update on the webhook configuration, nothing more.
    """
    now = now or dt.datetime.now(dt.UTC)
    secret = _read_json(core.read_namespaced_secret, settings.secret_name, settings.namespace)
    data = None if secret is None else {k: _decode(v) for k, v in (secret.get("data") or {}).items()}
    config = _read_json(admission.read_validating_webhook_configuration, settings.webhook_config)
    webhooks: list[dict[str, Any]] = [] if config is None else list(config.get("webhooks") or [])
    bundles = None if config is None else [_decode((w.get("clientConfig") or {}).get("caBundle")) for w in webhooks]
    decided = plan(data, bundles, settings.hosts, now)
    written = decided.action is not SecretAction.KEEP
    if written:
        data = material(decided.action, data, settings, now)
        _write_secret(core, settings, secret, data)
    patched = 0
    if config is not None and decided.patch_ca_bundle:
        assert data is not None
        wanted = base64.b64encode(data["ca.crt"]).decode()
        for webhook in webhooks:
            client_config = webhook.setdefault("clientConfig", {})
            if client_config.get("caBundle") != wanted:
                client_config["caBundle"] = wanted
                patched += 1
        if patched:
            config["webhooks"] = webhooks
            admission.replace_validating_webhook_configuration(settings.webhook_config, config)
    return RotationResult(decided, written, patched, config is not None)
