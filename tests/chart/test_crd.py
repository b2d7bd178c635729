"""The Promotion CustomResourceDefinition (charts/promotion-gate/crds/promotion.yaml)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.chart.helm import render
from tests.chart.k8s_models import structural_errors
from tools.render_manifests import CHART

CRD_PATH = CHART / "crds" / "promotion.yaml"
SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_names_scope_and_version(crd: dict[str, Any]) -> None:
    assert structural_errors(crd) == []
    assert crd["metadata"]["name"] == "promotions.promotion-gate.io"
    spec = crd["spec"]
    assert spec["group"] == "promotion-gate.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Promotion"
    assert spec["names"]["plural"] == "promotions"
    assert spec["names"]["shortNames"] == ["prom"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Image": ".spec.image",
        "Environment": ".spec.environment",
        "Phase": ".status.phase",
        "Record": ".status.recordId",
        "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize(
    ("image", "accepted"),
    [
        (f"ghcr.io/acme/api@{SHA256}", True),
        (f"ghcr.io/acme/api:1.4@{SHA256}", True),
        (f"localhost:5000/api@{SHA512}", True),
        ("ghcr.io/acme/api:1.4", False),
        ("ghcr.io/acme/api", False),
        (f"ghcr.io/acme/api@{SHA256.upper()}", False),
        ("ghcr.io/acme/api@sha256:" + "a" * 63, False),
        ("ghcr.io/acme/api@sha256:" + "a" * 65, False),
        (f"ghcr.io/acme/api@sha384:{'a' * 96}", False),
        (f"@{SHA256}", False),
        (f"ghcr.io/acme/api @{SHA256}", False),
    ],
)
def test_image_must_be_pinned_by_digest(crd: dict[str, Any], image: str, accepted: bool) -> None:
    pattern = _schema(crd)["properties"]["spec"]["properties"]["image"]["pattern"]
    # OpenAPI patterns are unanchored ECMA regexes; this one anchors itself.
    assert (re.search(pattern, image) is not None) is accepted


def test_spec_and_status_fields(crd: dict[str, Any]) -> None:
    schema = _schema(crd)
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["image", "environment"]
    assert set(spec["properties"]) == {"image", "environment", "evidence", "envelope"}
    assert spec["properties"]["envelope"]["type"] == "string"
    evidence = spec["properties"]["evidence"]["properties"]
    assert set(evidence) == {
        "gitCommit",
        "gitRepository",
        "ciRunId",
        "ciRunUrl",
        "testsPassed",
        "testsFailed",
        "scan",
        "approvers",
        "reason",
    }
    assert set(evidence["scan"]["properties"]) == {"scanner", "critical", "high", "medium", "low"}
    assert evidence["approvers"]["items"]["type"] == "string"
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Recorded", "Rejected", "Pending"]
    assert {"reason", "recordId", "observedGeneration"} <= set(status)


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    # Structural schemas (required for v1 CRDs): every node has a type, unless it preserves unknown fields.
    def walk(node: dict[str, Any], path: str) -> list[str]:
        problems = [] if "type" in node or node.get("x-kubernetes-preserve-unknown-fields") else [path]
        for name, child in node.get("properties", {}).items():
            problems += walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            problems += walk(node["items"], f"{path}[]")
        return problems

    assert walk(_schema(crd), "") == []


def test_chart_installs_the_crd_from_crds_directory() -> None:
    rendered = render(extra=["--include-crds"])
    assert sorted(rendered.names("CustomResourceDefinition")) == ["policyreports.wgpolicyk8s.io",
                                                                  "promotions.promotion-gate.io"]
    assert render().of_kind("CustomResourceDefinition") == []  # not a template: Helm never deletes it


def _openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """The CRD's OpenAPI v3 subset as JSON Schema: same keywords, minus the Kubernetes extensions."""
    converted = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "format"}
    if "properties" in node:
        converted["properties"] = {k: _openapi_to_jsonschema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            converted["additionalProperties"] = False  # the API server prunes (or strict-rejects) them
    if isinstance(node.get("items"), dict):
        converted["items"] = _openapi_to_jsonschema(node["items"])
    return converted


def _validate(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = _openapi_to_jsonschema(_schema(crd))
    schema["properties"]["metadata"] = {"type": "object"}
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def test_documented_example_is_a_valid_promotion(crd: dict[str, Any]) -> None:
    doc = (CHART.parent.parent / "docs" / "crd-promotion.md").read_text()
    example = yaml.safe_load(doc.split("## Example\n\n```yaml\n", 1)[1].split("```", 1)[0])
    assert example["kind"] == "Promotion"
    assert _validate(crd, example) == []


@pytest.mark.parametrize(
    ("spec", "accepted"),
    [
        ({"image": f"ghcr.io/acme/api@{SHA256}", "environment": "staging"}, True),
        ({"image": f"ghcr.io/acme/api@{SHA256}", "environment": "staging", "envelope": "{}"}, True),
        ({"image": f"ghcr.io/acme/api@{SHA256}"}, False),
        ({"image": "ghcr.io/acme/api:1.4", "environment": "staging"}, False),
        ({"image": f"ghcr.io/acme/api@{SHA256}", "environment": "Production"}, False),
        ({"image": f"ghcr.io/acme/api@{SHA256}", "environment": "ci", "evidence": {"testsFailed": -1}}, False),
        ({"image": f"ghcr.io/acme/api@{SHA256}", "environment": "ci", "evidence": {"approvers": "alice"}}, False),
    ],
)
def test_spec_validation(crd: dict[str, Any], spec: dict[str, Any], accepted: bool) -> None:
    obj = {"apiVersion": "promotion-gate.io/v1", "kind": "Promotion", "metadata": {"name": "p"}, "spec": spec}
    assert (_validate(crd, obj) == []) is accepted
