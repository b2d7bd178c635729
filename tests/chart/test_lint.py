"""`helm lint --strict` and the values schema, over the value combinations operators actually use."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.helm import DIGEST, run_helm, server_key_values, set_args
from tools.render_manifests import CHART

CA_BUNDLE = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="

COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults (PostgreSQL, 2 replicas, operator certificates)": {},
    "SQLite single replica": {"store.type": "sqlite", "replicaCount": 1},
    "PostgreSQL DSN in values": {
        "store.postgresql.existingSecret": "",
        "store.postgresql.dsn": "postgresql://u@db/pg",
    },
    "cert-manager": {"certificates.mode": "certManager"},
    "cert-manager with a ClusterIssuer": {
        "certificates.mode": "certManager",
        "certificates.certManager.issuerRef": {"name": "ca", "kind": "ClusterIssuer"},
    },
    "provided certificate": {
        "certificates.mode": "provided",
        "certificates.provided.secretName": "tls",
        "certificates.provided.caBundle": CA_BUNDLE,
    },
    "operator disabled": {"operator.enabled": False, "certificates.mode": "certManager"},
    "opt-in namespaces, failurePolicy Ignore": {
        "webhook.namespaceSelector.mode": "optIn",
        "webhook.failurePolicy": "Ignore",
        "webhook.timeoutSeconds": 5,
    },
    "out-of-cluster URL": {"webhook.url": "https://127.0.0.1:9443/validate", "webhook.caBundle": CA_BUNDLE},
    "image by digest, tokens, server key, monitoring": {
        "image.digest": DIGEST,
        "apiTokens.enabled": True,
        "apiTokens.tokens": [{"identity": "ci", "sha256": "a" * 64, "environments": ["ci"]}],
        **server_key_values(),
        "metrics.serviceMonitor.enabled": True,
        "priorityClassName": "system-cluster-critical",
    },
}


@pytest.mark.parametrize("values", list(COMBINATIONS.values()), ids=list(COMBINATIONS))
def test_helm_lint_strict_passes(values: dict[str, Any]) -> None:
    result = run_helm(["lint", "--strict", str(CHART), "--namespace", "promotion-gate", *set_args(values)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_values_satisfy_the_values_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    assert errors == []


SCHEMA_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "timeout above 30": ({"webhook.timeoutSeconds": 31}, "timeoutSeconds"),
    "timeout below 1": ({"webhook.timeoutSeconds": 0}, "timeoutSeconds"),
    "unknown failurePolicy": ({"webhook.failurePolicy": "Maybe"}, "failurePolicy"),
    "unknown certificate mode": ({"certificates.mode": "selfSigned"}, "mode"),
    "unknown store type": ({"store.type": "mysql"}, "type"),
    "unknown namespace selector mode": ({"webhook.namespaceSelector.mode": "all"}, "mode"),
    "malformed digest": ({"image.digest": "sha256:abc"}, "digest"),
    "plain http webhook URL": ({"webhook.url": "http://example.com/validate"}, "url"),
    "policy of another kind": ({"policy.kind": "ClusterPolicy"}, "kind"),
    "unknown policy mode": ({"policy.defaultMode": "block"}, "defaultMode"),
    "misspelt top-level key": ({"replicas": 3}, "replicas"),
}


@pytest.mark.parametrize(("values", "key"), list(SCHEMA_REFUSALS.values()), ids=list(SCHEMA_REFUSALS))
def test_values_schema_refuses_bad_values(values: dict[str, Any], key: str) -> None:
    result = run_helm(["template", "promotion-gate", str(CHART), *set_args(values)])
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert key in result.stderr
