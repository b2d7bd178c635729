"""Builders for real-shaped AdmissionReview payloads and workload objects (test helpers)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

DIGEST = "sha256:" + "a" * 64
POD_SPEC_PATH = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
GROUPS = {
    "Pod": ("", "v1", "pods"),
    "PodTemplate": ("", "v1", "podtemplates"),
    "ReplicationController": ("", "v1", "replicationcontrollers"),
    "Deployment": ("apps", "v1", "deployments"),
    "ReplicaSet": ("apps", "v1", "replicasets"),
    "StatefulSet": ("apps", "v1", "statefulsets"),
    "DaemonSet": ("apps", "v1", "daemonsets"),
    "Job": ("batch", "v1", "jobs"),
    "CronJob": ("batch", "v1", "cronjobs"),
}


def workload(kind: str, images: list[str] | dict[str, list[str]], *, name: str = "web",
             namespace: str = "team-a", annotations: dict[str, str] | None = None,
             template_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A workload whose Pod spec holds the given images (a list = containers)."""
    fields = images if isinstance(images, dict) else {"containers": images}
    spec: dict[str, Any] = {}
    for field, imgs in fields.items():
        spec[field] = [{"name": f"c{i}", "image": img} for i, img in enumerate(imgs)]
    group, version, _ = GROUPS[kind]
    obj: dict[str, Any] = {
        "apiVersion": f"{group}/{version}" if group else version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
    }
    if annotations:
        obj["metadata"]["annotations"] = annotations
    path = POD_SPEC_PATH[kind]
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = spec
    if template_annotations and kind != "Pod":
        node.setdefault("metadata", {})["annotations"] = template_annotations
    return obj


def review(obj: dict[str, Any] | None, *, operation: str = "CREATE", old: dict[str, Any] | None = None,
           kind: str | None = None, namespace: str | None = None, sub_resource: str | None = None,
           user: str = "alice", groups: list[str] | None = None, dry_run: bool = False,
           uid: str | None = None) -> dict[str, Any]:
    source = obj or old or {}
    kind = kind or source.get("kind", "Pod")
    group, version, resource = GROUPS.get(kind, ("", "v1", kind.lower() + "s"))
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": resource},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "requestResource": {"group": group, "version": version, "resource": resource},
        "name": source.get("metadata", {}).get("name", ""),
        "namespace": namespace if namespace is not None else source.get("metadata", {}).get("namespace", ""),
        "operation": operation,
        "userInfo": {"username": user, "groups": groups or ["system:authenticated"]},
        "object": copy.deepcopy(obj),
        "oldObject": copy.deepcopy(old),
        "dryRun": dry_run,
        "options": None if operation == "CONNECT" else {
            "kind": {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}[operation],
            "apiVersion": "meta.k8s.io/v1",
        },
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
