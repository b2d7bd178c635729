"""Workload manifests the API server accepts (valid selectors, names, schedules), as plain dicts."""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

# A well-formed digest, the kind a registry returns (the image never has to exist: nothing is pulled).
DIGEST = "sha256:" + hashlib.sha256(b"ghcr.io/acme/payment-api 1.4").hexdigest()
TAGGED = "ghcr.io/acme/payment-api:1.4"
PINNED = f"ghcr.io/acme/payment-api@{DIGEST}"
PROBE_IMAGE = "busybox:1.36"

Manifest = dict[str, Any]


def containers(images: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "image": image} for name, image in images.items()]


def pod_spec(images: dict[str, str], init_images: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers(images)}
    if init_images:
        spec["initContainers"] = containers(init_images)
    return spec


def pod(name: str, namespace: str, images: dict[str, str], *, init_images: dict[str, str] | None = None,
        labels: dict[str, str] | None = None) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": pod_spec(images, init_images),
    }


def deployment(name: str, namespace: str, images: dict[str, str], *, replicas: int = 2,
               init_images: dict[str, str] | None = None) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec(images, init_images)},
        },
    }


def cronjob(name: str, namespace: str, images: dict[str, str]) -> Manifest:
    template_spec = {**pod_spec(images), "restartPolicy": "OnFailure"}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "schedule": "*/15 * * * *",
            "jobTemplate": {"spec": {"template": {"spec": template_spec}}},
        },
    }


def to_yaml(*documents: Manifest) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)
