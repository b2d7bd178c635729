"""Where images live in Kubernetes objects, with the field path of every container.

A workload kind is an API group and a kind (``apps``/``Deployment``; a ``DaemonSet`` of another group
is not an ``apps`` DaemonSet) with the path of its Pod spec. The built-in kinds are below; a policy
can name more (``workloadKinds``: Argo Rollouts, OpenShift DeploymentConfigs, …). The walk is
defensive: the objects come from the API server (already schema-validated) or from a developer's
manifest (anything goes), and a wrong shape must become a clear :class:`WorkloadShapeError`, never an
exception from deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader

BREAK_GLASS_ANNOTATION = "promotion-gate.io/break-glass"



@dataclass(frozen=True, slots=True)
class WorkloadKind:
    """A kind that carries container images: its API group, kind, plural resource and Pod spec path."""

    group: str  # "" for the core group
    kind: str
    resource: str  # plural, as in the webhook's rules
    pod_spec: tuple[str, ...]  # path from the object's root to its PodSpec

    @property
    def group_kind(self) -> str:
        return f"{self.group}/{self.kind}" if self.group else self.kind


_TEMPLATE = ("spec", "template", "spec")
BUILT_IN_KINDS: tuple[WorkloadKind, ...] = (
    WorkloadKind("", "Pod", "pods", ("spec",)),
    WorkloadKind("", "PodTemplate", "podtemplates", ("template", "spec")),
    WorkloadKind("", "ReplicationController", "replicationcontrollers", _TEMPLATE),
    WorkloadKind("apps", "Deployment", "deployments", _TEMPLATE),
    WorkloadKind("apps", "ReplicaSet", "replicasets", _TEMPLATE),
    WorkloadKind("apps", "StatefulSet", "statefulsets", _TEMPLATE),
    WorkloadKind("apps", "DaemonSet", "daemonsets", _TEMPLATE),
    WorkloadKind("batch", "Job", "jobs", _TEMPLATE),
    WorkloadKind("batch", "CronJob", "cronjobs", ("spec", "jobTemplate", "spec", "template", "spec")),
)


def group_of(api_version: object) -> str | None:
    """The API group of an ``apiVersion`` (``apps/v1`` -> ``apps``, ``v1`` -> ``""``); None if not a string."""
    if not isinstance(api_version, str) or not api_version:
        return None
    return api_version.rpartition("/")[0]


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


_read = FieldReader(WorkloadShapeError)


def extract(obj: Any, kind: WorkloadKind, *, namespace: str = "", name: str = "") -> Workload:
    """Read identity, break-glass annotations and every container image of an object of ``kind``."""
    root = _read.mapping(obj, "object")
    metadata = _read.mapping(root.get("metadata"), "metadata")
    name = name or _read.text(metadata.get("name"), "metadata.name") or _read.text(
        metadata.get("generateName"), "metadata.generateName"
    )
    namespace = namespace or _read.text(metadata.get("namespace"), "metadata.namespace")
    places: list[tuple[str, str]] = []
    for path in metadata_places(kind.pod_spec):
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
        kind=kind.kind,
        namespace=namespace,
        name=name,
        images=tuple(_images(root, kind.pod_spec)),
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

