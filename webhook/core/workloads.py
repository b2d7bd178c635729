"""Where images live in Kubernetes objects, with the field path of every container.

Each supported kind maps to the path of its Pod spec. The walk is defensive: the objects come from
the API server (already schema-validated) or from a developer's manifest (anything goes), and a wrong
shape must become a clear :class:`WorkloadShapeError`, never an exception from deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader

BREAK_GLASS_ANNOTATION = "promotion-gate.io/break-glass"

# kind -> path from the object root to its PodSpec
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
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
# the object (template) whose metadata is what ends up on the Pods
POD_METADATA_PATHS: dict[str, tuple[str, ...]] = {
    kind: (*path[:-1], "metadata") if len(path) > 1 else ("metadata",) for kind, path in POD_SPEC_PATHS.items()
}
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


class WorkloadShapeError(InvalidInput):
    """The object does not have the shape its kind requires."""


@dataclass(frozen=True, slots=True)
class ContainerImage:
    field_path: str  # e.g. spec.template.spec.containers[0]
    container: str
    image: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    kind: str
    namespace: str
    name: str
    images: tuple[ContainerImage, ...]
    annotations: Mapping[str, str]
    deleting: bool
    controlled: bool = False  # created by a controller (has an ownerReference with controller: true)

    @property
    def display_name(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @property
    def break_glass(self) -> str | None:
        return self.annotations.get(BREAK_GLASS_ANNOTATION)


def supports(kind: str) -> bool:
    return kind in POD_SPEC_PATHS


_read = FieldReader(WorkloadShapeError)


def extract(obj: Any, *, kind: str | None = None, namespace: str = "", name: str = "") -> Workload:
    """Read kind, identity, annotations and every container image of a supported object."""
    root = _read.mapping(obj, "object")
    kind = kind or root.get("kind")
    if not isinstance(kind, str) or not supports(kind):
        raise WorkloadShapeError(f"kind {kind!r} is not a workload kind")
    metadata = _read.mapping(root.get("metadata"), "metadata")
    name = name or _read.text(metadata.get("name"), "metadata.name") or _read.text(
        metadata.get("generateName"), "metadata.generateName"
    )
    namespace = namespace or _read.text(metadata.get("namespace"), "metadata.namespace")
    annotations = _read.string_map(metadata.get("annotations"), "metadata.annotations")
    template_meta_path = POD_METADATA_PATHS[kind]
    if template_meta_path != ("metadata",):
        template_meta = _walk(root, template_meta_path)
        template_annotations = _read.string_map(
            _read.mapping(template_meta, ".".join(template_meta_path)).get("annotations"),
            ".".join((*template_meta_path, "annotations")),
        )
        # The workload's own annotation wins; the template's is what its Pods will carry.
        annotations = {**template_annotations, **annotations}
    deleting = metadata.get("deletionTimestamp") is not None
    owners = metadata.get("ownerReferences") or []
    controlled = isinstance(owners, list) and any(isinstance(o, Mapping) and o.get("controller") is True
                                                  for o in owners)
    return Workload(
        kind=kind,
        namespace=namespace,
        name=name,
        images=tuple(_images(root, POD_SPEC_PATHS[kind])),
        annotations=annotations,
        deleting=deleting,
        controlled=controlled,
    )


def _walk(root: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = root
    for depth, key in enumerate(path):
        node = _read.mapping(node, ".".join(path[:depth]) or "object").get(key)
    return node


def _images(root: Mapping[str, Any], spec_path: tuple[str, ...]) -> list[ContainerImage]:
    prefix = ".".join(spec_path)
    spec = _read.mapping(_walk(root, spec_path), prefix)
    found: list[ContainerImage] = []
    for field in CONTAINER_FIELDS:
        containers = spec.get(field)
        if containers is None:
            continue
        if not isinstance(containers, list):
            raise WorkloadShapeError(f"{prefix}.{field} must be a list")
        for index, container in enumerate(containers):
            path = f"{prefix}.{field}[{index}]"
            if not isinstance(container, Mapping):
                raise WorkloadShapeError(f"{path} must be an object")
            cname = _read.text(container.get("name"), f"{path}.name")
            # a missing image reads as "" and is reported as an invalid reference, not a crash
            image = _read.text(container.get("image"), f"{path}.image")
            found.append(ContainerImage(field_path=path, container=cname, image=image))
    return found

