"""The PolicyReport CRD (charts/promotion-gate/crds/policyreport.yaml) and what the operator writes into it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart.k8s_models import structural_errors
from tests.chart.test_crd import _openapi_to_jsonschema
from tools.render_manifests import CHART
from webhook import policy_reports, scan
from webhook.core import policy as policy_mod
from webhook.core.promotion import NoRecords
from webhook.running import Inventory, NamespaceInfo, observe

CRD_PATH = CHART / "crds" / "policyreport.yaml"
DIGEST = "sha256:" + "d" * 64


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


def validate(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = _openapi_to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def test_the_policy_working_groups_names_version_and_columns(crd: dict[str, Any]) -> None:
    assert structural_errors(crd) == []
    assert crd["metadata"]["name"] == "policyreports.wgpolicyk8s.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("wgpolicyk8s.io", "Namespaced")
    assert spec["names"] == {"kind": "PolicyReport", "listKind": "PolicyReportList", "plural": "policyreports",
                             "singular": "policyreport", "shortNames": ["polr"]}
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha2", True, True)
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Kind", "Name", "Pass", "Fail", "Warn", "Error", "Skip", "Age"]


def test_every_result_field_of_v1alpha2(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert sorted(schema["properties"]) == ["apiVersion", "kind", "metadata", "results", "scope", "scopeSelector",
                                            "summary"]
    result = schema["properties"]["results"]["items"]
    assert result["required"] == ["policy"]
    assert sorted(result["properties"]) == ["category", "message", "policy", "properties", "resourceSelector",
                                            "resources", "result", "rule", "scored", "severity", "source",
                                            "timestamp"]
    assert result["properties"]["result"]["enum"] == ["pass", "fail", "warn", "error", "skip"]
    assert result["properties"]["severity"]["enum"] == ["critical", "high", "low", "medium", "info"]


def deployment(name: str, image: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "payments-prod", "uid": f"uid-{name}"},
            "spec": {"template": {"metadata": {}, "spec": {"containers": [{"name": "api", "image": image}]}}}}


def test_what_the_operator_writes_fits_the_crd(crd: dict[str, Any]) -> None:
    inventory = Inventory(namespaces={"payments-prod": NamespaceInfo("payments-prod")}, objects=[
        observe(deployment("tagged", "ghcr.io/acme/api:1.4"), kind="Deployment", api_version="apps/v1"),
        observe(deployment("broken", "Bad Image"), kind="Deployment", api_version="apps/v1"),
        observe(deployment("pinned", f"ghcr.io/acme/api@{DIGEST}"), kind="Deployment", api_version="apps/v1"),
    ])
    policy = policy_mod.Policy(unmapped=policy_mod.Unmapped.DIGEST_ONLY)
    report = scan.run(inventory, policy, NoRecords(), observed_at="2026-11-25T10:00:00Z")
    built = policy_reports.build(report)["payments-prod"]
    for body in (built.body(1764064800), built.body(1764064800, patch=True)):
        assert validate(crd, body) == []
    assert built.summary == {"pass": 1, "fail": 2, "warn": 0, "error": 0, "skip": 0}
    assert [(r["result"], r["rule"], r["resources"][0]["name"]) for r in built.results] == [
        ("fail", "invalid-reference", "broken"), ("fail", "mutable-tag", "tagged"),
        ("pass", "promoted-digests", "pinned")]


def test_a_report_written_by_another_engine_fits_too(crd: dict[str, Any]) -> None:
    # Kyverno-style results: severity critical, a resourceSelector, a scope; the CRD must keep accepting them.
    other: dict[str, Any] = {"apiVersion": "wgpolicyk8s.io/v1alpha2", "kind": "PolicyReport", "metadata": {"name": "polr-ns-x"},
                             "scope": {"kind": "Namespace", "name": "x"},
                             "summary": {"pass": 0, "fail": 1, "warn": 0, "error": 0, "skip": 0},
                             "results": [{"source": "kyverno", "policy": "require-labels", "rule": "check-team",
                                          "result": "fail", "severity": "critical", "scored": True,
                                          "timestamp": {"seconds": 1, "nanos": 0},
                                          "resourceSelector": {"matchLabels": {"app": "web"}},
                                          "message": "label team is required",
                                          "properties": {"category": "Best Practices"}}]}
    assert validate(crd, other) == []
    wrong = {**other, "results": [{**other["results"][0], "result": "failed"}]}
    assert validate(crd, wrong) == ["'failed' is not one of ['pass', 'fail', 'warn', 'error', 'skip']"]


def test_a_namespace_too_big_for_one_object_keeps_its_failures_and_counts_everything() -> None:
    objects = [observe(deployment(f"app-{i:05d}", "ghcr.io/acme/" + "x" * 200 + ":1"), kind="Deployment",
                       api_version="apps/v1") for i in range(3000)]
    inventory = Inventory(namespaces={"payments-prod": NamespaceInfo("payments-prod")}, objects=objects)
    policy = policy_mod.Policy(unmapped=policy_mod.Unmapped.DIGEST_ONLY)
    built = policy_reports.build(scan.run(inventory, policy, NoRecords(), observed_at="t"))["payments-prod"]
    assert built.summary["fail"] == 3000
    assert 0 < len(built.results) < 3000 and built.omitted == 3000 - len(built.results)
    body = built.body(0)
    assert body["metadata"]["annotations"] == {policy_reports.OMITTED_ANNOTATION: str(built.omitted)}
    import orjson

    assert len(orjson.dumps(body)) <= policy_reports.MAX_REPORT_BYTES + 100_000
