"""Offline structural check of rendered objects against the Kubernetes API types.

The Kubernetes Python client's models are generated from the API server's OpenAPI document: each has
``openapi_types`` (field -> type) and ``attribute_map`` (field -> JSON name). Walking a rendered object
through them catches misspelt or misplaced fields and wrong value types; deserialising it with the
client's own validation catches missing required fields. The API server's dry-run is the final word
(end-to-end tests); this is the fast, offline first line.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import kubernetes.client
from kubernetes.client import ApiClient

CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "ClusterIssuer",
    }
)

# Custom resources with no model in the client: the fields this chart may use, from the cert-manager
# (cert-manager.io/v1) and Prometheus operator (monitoring.coreos.com/v1) API references.
CUSTOM_SPEC_FIELDS: dict[tuple[str, str], frozenset[str]] = {
    ("cert-manager.io/v1", "Issuer"): frozenset({"selfSigned", "ca", "acme", "vault", "venafi"}),
    ("cert-manager.io/v1", "ClusterIssuer"): frozenset({"selfSigned", "ca", "acme", "vault", "venafi"}),
    ("cert-manager.io/v1", "Certificate"): frozenset(
        {
            "secretName",
            "commonName",
            "dnsNames",
            "ipAddresses",
            "uris",
            "emailAddresses",
            "duration",
            "renewBefore",
            "isCA",
            "usages",
            "privateKey",
            "issuerRef",
            "subject",
            "secretTemplate",
            "revisionHistoryLimit",
            "keystores",
            "encodeUsagesInRequest",
            "literalSubject",
        }
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): frozenset(
        {
            "selector",
            "endpoints",
            "namespaceSelector",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "attachMetadata",
        }
    ),
}

_LIST = re.compile(r"^List\[(.+)\]$")
_DICT = re.compile(r"^Dict\[str, (.+)\]$")


def model_name(api_version: str, kind: str) -> str | None:
    version = api_version.rsplit("/", 1)[-1]
    name = version[0].upper() + version[1:] + kind
    return name if hasattr(kubernetes.client.models, name) else None


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if value is None:
        return
    if match := _LIST.match(type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for index, item in enumerate(value):
            _check(item, match.group(1), f"{path}[{index}]", errors)
        return
    if match := _DICT.match(type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        for key, item in value.items():
            _check(item, match.group(1), f"{path}.{key}", errors)
        return
    primitive: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "datetime": (str,),
        "date": (str,),
    }
    if type_name == "object":
        return
    if type_name == "bytes":  # []byte: base64 in JSON
        try:
            base64.b64decode(value, validate=True)
        except (TypeError, ValueError):
            errors.append(f"{path}: expected base64 data, got {value!r}")
        return
    if type_name in primitive:
        ok = isinstance(value, primitive[type_name]) and not (type_name in ("int", "float") and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    model = getattr(kubernetes.client.models, type_name, None)
    if model is None:
        errors.append(f"{path}: unknown type {type_name}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field for {type_name}")
            continue
        _check(item, model.openapi_types[by_json[key]], f"{path}.{key}", errors)


def structural_errors(obj: dict[str, Any]) -> list[str]:
    """Problems with one rendered object; empty when it fits its API type."""
    kind, api_version = str(obj.get("kind", "")), str(obj.get("apiVersion", ""))
    where = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
    errors: list[str] = []
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        return [f"{where}: metadata.name is required"]
    namespaced = kind not in CLUSTER_SCOPED
    if namespaced and not metadata.get("namespace"):
        errors.append(f"{where}: namespaced object without metadata.namespace")
    if not namespaced and "namespace" in metadata:
        errors.append(f"{where}: cluster-scoped object with metadata.namespace")
    name = model_name(api_version, kind)
    if name is not None:
        _check(obj, name, where, errors)
        if not errors:
            try:
                ApiClient()._ApiClient__deserialize(obj, name)  # type: ignore[attr-defined]
            except (ValueError, TypeError) as exc:
                errors.append(f"{where}: {exc}")
        return errors
    allowed = CUSTOM_SPEC_FIELDS.get((api_version, kind))
    if allowed is None:
        return [*errors, f"{where}: no model or known fields for {api_version} {kind}"]
    _check(metadata, "V1ObjectMeta", f"{where}.metadata", errors)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [*errors, f"{where}: spec must be an object"]
    errors.extend(f"{where}.spec.{key}: unknown field" for key in spec if key not in allowed)
    return errors
