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


def metadata_places(pod_spec: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Every metadata that controllers copy onto what they create from this object, the object's own first.

    Each template on the way to the Pod spec has one: a Deployment's ``spec.template.metadata`` (its
    Pods), a CronJob's ``spec.jobTemplate.metadata`` (its Jobs) and ``spec.jobTemplate.spec.template
    .metadata`` (their Pods). An annotation in any of them reaches objects admitted later.
    """
    return (("metadata",), *((*pod_spec[:index], "metadata") for index in range(1, len(pod_spec))
                             if pod_spec[index] == "spec"))


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
    # The break-glass annotation wherever it is set: (metadata path, value), the object's own first.
    break_glass_places: tuple[tuple[str, str], ...] = ()
    deleting: bool = False
    controlled: bool = False  # created by a controller (has an ownerReference with controller: true)

    @property
    def display_name(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @property
    def break_glass(self) -> str | None:
        """The reason this object is admitted by: its own annotation, else its templates' (outermost first)."""
        return self.break_glass_places[0][1] if self.break_glass_places else None

    def sets_break_glass_over(self, old: Workload | None) -> bool:
        """Whether this version adds or changes the annotation in any place, compared with ``old``.

        Each place is judged on its own: a value already present on the object must not mask one
        added to, moved to or changed in a template, whose copies controllers create later. Removing
        the annotation anywhere sets nothing.
        """
        before = dict(old.break_glass_places) if old is not None else {}
        return any(before.get(place) != value for place, value in self.break_glass_places)


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
    places: list[tuple[str, str]] = []
    for path in metadata_places(POD_SPEC_PATHS[kind]):
        where = ".".join(path)
        annotations = _read.string_map(_read.mapping(_walk(root, path), where).get("annotations"),
                                       f"{where}.annotations")
        if BREAK_GLASS_ANNOTATION in annotations:
            places.append((where, annotations[BREAK_GLASS_ANNOTATION]))
    deleting = metadata.get("deletionTimestamp") is not None
    owners = metadata.get("ownerReferences") or []
    controlled = isinstance(owners, list) and any(isinstance(o, Mapping) and o.get("controller") is True
                                                  for o in owners)
    return Workload(
        kind=kind,
        namespace=namespace,
        name=name,
        images=tuple(_images(root, POD_SPEC_PATHS[kind])),
        break_glass_places=tuple(places),
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

