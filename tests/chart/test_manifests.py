"""manifests/ is the chart rendered with default values, and stays that way."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm import helm_binary
from tests.chart.k8s_models import structural_errors
from tools import render_manifests
from tools.render_manifests import MANIFESTS, RenderError, differences, find_helm, parse_documents


@functools.cache
def rendered() -> dict[str, str]:
    return render_manifests.render(helm=helm_binary())


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found:
        return found
    helm = Path(find_helm())
    candidate = helm.parent / "kubectl"
    assert candidate.is_file(), "kubectl not found on PATH or next to helm; run `make toolchain`"
    return str(candidate)


def test_manifests_are_up_to_date() -> None:
    diff = differences(rendered(), MANIFESTS)
    assert diff == "", f"manifests/ is stale; run `python -m tools.render_manifests`:\n{diff}"


def test_check_mode_reports_a_stale_directory_with_a_diff(tmp_path: Path) -> None:
    render_manifests.write(rendered(), tmp_path)
    assert differences(rendered(), tmp_path) == ""
    deployment = tmp_path / "06-deployment.yaml"
    deployment.write_text(deployment.read_text().replace("replicas: 2", "replicas: 3"))
    (tmp_path / "99-extra.yaml").write_text("kind: Leftover\n")
    diff = differences(rendered(), tmp_path)
    assert "-  replicas: 3\n+  replicas: 2\n" in diff
    assert "manifests/99-extra.yaml" in diff
    result = subprocess.run(
        [sys.executable, "-m", "tools.render_manifests", "--check", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=render_manifests.ROOT,
        check=False,
        env={"PATH": f"{Path(helm_binary()).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    assert "manifests/ is out of date" in result.stderr


def _objects() -> list[dict[str, Any]]:
    files = rendered()
    names = yaml.safe_load(files["kustomization.yaml"])["resources"]
    return [obj for name in names for obj in parse_documents(files[name])]


def test_objects_in_apply_order_namespace_first_webhook_configuration_last() -> None:
    kinds = [str(obj["kind"]) for obj in _objects()]
    assert kinds[0] == "Namespace"
    assert kinds[1] == "CustomResourceDefinition"
    assert kinds[-1] == "ValidatingWebhookConfiguration"
    assert "Pod" not in kinds  # the helm test hook is not a manifest
    assert kinds.count("Deployment") == 2


def test_every_manifest_fits_its_kubernetes_api_type() -> None:
    objects = _objects()
    assert [e for obj in objects for e in structural_errors(obj)] == []
    namespaced = [o for o in objects if "namespace" in o["metadata"]]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"promotion-gate"}
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels
        assert labels.get("app.kubernetes.io/managed-by", "kubectl") == "kubectl"


def test_namespace_enforces_pod_security_restricted() -> None:
    namespace = _objects()[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kustomization_builds_with_kubectl() -> None:
    result = subprocess.run(
        [kubectl(), "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    built = parse_documents(result.stdout)
    assert sorted(str(o["kind"]) for o in built) == sorted(str(o["kind"]) for o in _objects())


def test_missing_helm_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("PROMOTION_GATE_CACHE", str(tmp_path / "nowhere"))
    with pytest.raises(RenderError, match="helm not found"):
        find_helm()
