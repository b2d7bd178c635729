"""Render the chart with the real helm binary and look at the objects (test helpers)."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tools.render_manifests import CHART, RenderError, find_helm, parse_documents

RELEASE = "promotion-gate"
NAMESPACE = "promotion-gate"
DIGEST = "sha256:" + "0123456789abcdef" * 4


def server_key_values(secret: str = "server-key") -> dict[str, Any]:
    """serverKey enabled as the chart requires it: its public key named under policy.audit.checkpointKeys."""
    from webhook.core import keys

    public = keys.generate("ed25519").verifying.public_pem().decode()
    return {"serverKey.enabled": True, "serverKey.existingSecret": secret,
            "policy.keys": {"server": {"publicKey": public}}, "policy.audit": {"checkpointKeys": ["server"]}}


@functools.cache
def helm_binary() -> str:
    """helm from PATH or the toolchain cache; the chart tests fail (never skip) without it."""
    try:
        return find_helm()
    except RenderError as exc:
        raise AssertionError(str(exc)) from exc


def set_args(values: Mapping[str, Any]) -> list[str]:
    """--set-json for each key: keeps types (ints, bools, lists) exactly as written in the test."""
    import json

    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def names(self, kind: str) -> list[str]:
        return [o["metadata"]["name"] for o in self.of_kind(kind)]

    @property
    def webhook_config(self) -> dict[str, Any]:
        return self.one("ValidatingWebhookConfiguration")

    @property
    def webhook(self) -> dict[str, Any]:
        webhooks = self.webhook_config["webhooks"]
        assert len(webhooks) == 1
        return dict(webhooks[0])

    def deployment(self, component: str = "webhook") -> dict[str, Any]:
        found = [
            d
            for d in self.of_kind("Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {component} Deployment"
        return found[0]

    def container(self, component: str = "webhook") -> dict[str, Any]:
        containers = self.deployment(component)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return dict(containers[0])

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every Pod spec the chart would run: Deployment templates and bare Pods (the helm test)."""
        for obj in self.objects:
            if obj["kind"] == "Pod":
                yield f"Pod/{obj['metadata']['name']}", obj["spec"]
            elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def run_helm(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=False, timeout=120)


def template_args(
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = NAMESPACE,
    release: str = RELEASE,
    chart: Path = CHART,
    extra: Sequence[str] = (),
) -> list[str]:
    return ["template", release, str(chart), "--namespace", namespace, *set_args(values or {}), *extra]


def render(
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = NAMESPACE,
    release: str = RELEASE,
    extra: Sequence[str] = (),
) -> Rendered:
    result = run_helm(template_args(values, namespace=namespace, release=release, extra=extra))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return Rendered(parse_documents(result.stdout))


def render_error(values: Mapping[str, Any]) -> str:
    """helm's error output for values the chart must refuse."""
    result = run_helm(template_args(values))
    assert result.returncode != 0, "helm template succeeded but was expected to fail"
    return result.stderr


_NOTES_WRAPPER = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-notes
data:
  notes: {{ include "test.notes" . | quote }}
"""


def render_notes(values: Mapping[str, Any] | None, tmp: Path) -> str:
    """NOTES.txt as Helm renders it. `helm template` never prints the notes and `install --dry-run`
    needs a cluster, so a copy of the chart defines NOTES.txt as a named template and renders it into
    a ConfigMap, through the same template engine and values."""
    chart = tmp / "promotion-gate"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "\n{{- end }}\n")
    (chart / "templates" / "rendered-notes.yaml").write_text(_NOTES_WRAPPER)
    result = run_helm(template_args(values, chart=chart, extra=["--show-only", "templates/rendered-notes.yaml"]))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return str(data["data"]["notes"])
