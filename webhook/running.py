"""What runs in the cluster: Pods and workloads as listed, their owners, and where a digest runs.

Objects arrive as decoded JSON from a paginated list or a watch (:mod:`webhook.cluster_listing`) and
are cut down at once to what scanning and tracing need (:class:`Observed`): identity, the controller
that owns it, the container images read by the admission core's own walk
(:func:`webhook.core.workloads.extract`), only the break-glass annotation, and for Pods when each
container started and which digest the runtime resolved. A large annotation such as
``kubectl.kubernetes.io/last-applied-configuration`` is never kept, so memory grows with the number
of containers, not with the size of the objects.

Owner chains are resolved from the listed objects alone (by uid, never by a GET): a Pod of a
Deployment is ``Pod -> ReplicaSet -> Deployment``. A chain stops at an owner that was not listed (an
unknown kind such as an Argo ``Rollout``, a ``Node`` for mirror Pods, an owner already deleted) and
names it from the ownerReference; cycles and absurd depths stop it too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from webhook.core import references, workloads
from webhook.core.workloads import ContainerImage, Workload
from webhook.environments import ENVIRONMENT_LABEL

# A scan lists the built-in workload kinds only, each from its own API group.
POD_SPEC_PATHS = {kind.kind: kind.pod_spec for kind in workloads.BUILT_IN_KINDS}

MAX_OWNER_DEPTH = 8
# Pods in these phases run nothing any more (their Job or CronJob template is still judged).
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
STATUS_FIELDS = {"initContainerStatuses": "initContainers", "containerStatuses": "containers",
                 "ephemeralContainerStatuses": "ephemeralContainers"}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A workload or Pod by identity: enough to name it, to point an Event at it, to follow its owner."""

    kind: str
    namespace: str
    name: str
    uid: str = ""
    api_version: str = ""

    @property
    def display_name(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """A listed Pod or workload, cut down to what scanning and tracing read."""

    ref: ObjectRef
    workload: Workload  # kind, namespace, name, images with field paths, only the break-glass annotation
    controller: ObjectRef | None = None  # the ownerReference with controller: true
    phase: str = ""  # Pods only
    node: str = ""
    created: str = ""
    started: Mapping[str, str] = field(default_factory=dict)  # container name -> when it started (Pods)
    resolved: Mapping[str, str] = field(default_factory=dict)  # container name -> digest the runtime pulled

    @property
    def is_pod(self) -> bool:
        return self.ref.kind == "Pod"

    @property
    def runs(self) -> bool:
        """A Pod that runs (or will run) its containers: not Succeeded or Failed."""
        return self.is_pod and self.phase not in FINISHED_PHASES

    def since(self, container: str) -> str:
        return self.started.get(container) or self.created


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    environment_label: str | None = None  # the promotion-gate.io/environment label, if any
    terminating: bool = False


class Unreadable(ValueError):
    """A listed object that cannot be read (the message names it and the field)."""


@dataclass
class Inventory:
    """Everything one scan judges: namespaces (with their labels) and the Pods and workloads in them."""

    namespaces: dict[str, NamespaceInfo] = field(default_factory=dict)
    objects: list[Observed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: int = 0  # API requests the listing made

    def by_uid(self) -> dict[str, Observed]:
        return {o.ref.uid: o for o in self.objects if o.ref.uid}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _mapping(value: Any) -> Mapping[str, Any]:
    # Decoded JSON: a dict or nothing usable (the cheap check; this runs for every listed object).
    return value if isinstance(value, dict) else {}


def _controller(metadata: Mapping[str, Any], namespace: str) -> ObjectRef | None:
    owners = metadata.get("ownerReferences")
    if not isinstance(owners, list):
        return None
    for owner in owners:
        if isinstance(owner, dict) and owner.get("controller") is True:
            kind, name = _text(owner.get("kind")), _text(owner.get("name"))
            if kind and name:
                # Namespaced objects can only be owned from their own namespace, or by a cluster-scoped
                # object (a Node owns mirror Pods); the ownerReference does not say which, the kind does.
                scope = "" if kind in CLUSTER_SCOPED_OWNERS else namespace
                return ObjectRef(kind, scope, name, _text(owner.get("uid")), _text(owner.get("apiVersion")))
    return None


CLUSTER_SCOPED_OWNERS = frozenset({"Node"})


def _resolved_digest(image_id: str) -> str:
    """The repository digest in a container status's imageID (``repo@sha256:…``), else ""."""
    _, at, digest = image_id.rpartition("@")
    return digest if at and references.is_digest(digest) else ""


def _workload_kind(kind: str, api_version: str) -> workloads.WorkloadKind:
    group = workloads.group_of(api_version) or ""
    found = next((k for k in workloads.BUILT_IN_KINDS if k.kind == kind and k.group == group), None)
    if found is None:
        raise Unreadable(f"{api_version} {kind} is not a workload kind")
    return found


def observe(obj: Any, *, kind: str, api_version: str) -> Observed:
    """Read one listed object (list items carry no ``kind``); raises :class:`Unreadable`."""
    root = _mapping(obj)
    metadata = _mapping(root.get("metadata"))
    namespace, name = _text(metadata.get("namespace")), _text(metadata.get("name"))
    try:
        extracted = workloads.extract(root, _workload_kind(kind, api_version), namespace=namespace, name=name)
    except workloads.WorkloadShapeError as exc:
        raise Unreadable(f"{kind} {namespace}/{name or '?'} cannot be read: {exc}") from exc
    ref = ObjectRef(kind, namespace, name, _text(metadata.get("uid")), api_version)
    controller, created = _controller(metadata, namespace), _text(metadata.get("creationTimestamp"))
    if kind != "Pod":
        return Observed(ref=ref, workload=extracted, controller=controller, created=created)
    spec, status = _mapping(root.get("spec")), _mapping(root.get("status"))
    pod_started = _text(status.get("startTime"))
    started: dict[str, str] = {}
    resolved: dict[str, str] = {}
    for status_field in STATUS_FIELDS:
        statuses = status.get(status_field)
        for entry in statuses if isinstance(statuses, list) else ():
            entry = _mapping(entry)
            container = _text(entry.get("name"))
            if not container:
                continue
            running = _mapping(_mapping(entry.get("state")).get("running"))
            started[container] = _text(running.get("startedAt")) or pod_started
            digest = _resolved_digest(_text(entry.get("imageID")))
            if digest:
                resolved[container] = digest
    if pod_started:
        for image in extracted.images:
            started.setdefault(image.container, pod_started)
    return Observed(ref=ref, workload=extracted, controller=controller, created=created,
                    phase=_text(status.get("phase")), node=_text(spec.get("nodeName")),
                    started={k: v for k, v in started.items() if v}, resolved=resolved)


def namespace_info(obj: Any) -> NamespaceInfo:
    metadata = _mapping(_mapping(obj).get("metadata"))
    labels = _mapping(metadata.get("labels"))
    label = labels.get(ENVIRONMENT_LABEL)
    return NamespaceInfo(_text(metadata.get("name")), label if isinstance(label, str) and label else None,
                         metadata.get("deletionTimestamp") is not None)


# --- owner chains ------------------------------------------------------------------------------------


def chain(obj: Observed, index: Mapping[str, Observed]) -> tuple[tuple[ObjectRef, Observed | None], ...]:
    """``obj`` and its controllers, bottom up: each reference with the listed object, if it was listed."""
    links: list[tuple[ObjectRef, Observed | None]] = [(obj.ref, obj)]
    seen = {obj.ref.uid}
    current: Observed | None = obj
    while current is not None and current.controller is not None and len(links) < MAX_OWNER_DEPTH:
        owner_ref = current.controller
        if owner_ref.uid in seen:
            break  # a cycle of ownerReferences: the object is its own top
        seen.add(owner_ref.uid)
        listed = index.get(owner_ref.uid) if owner_ref.uid else None
        if listed is not None and (listed.ref.kind, listed.ref.name) != (owner_ref.kind, owner_ref.name):
            listed = None  # a uid that names something else: trust the reference, not the lookup
        links.append((listed.ref if listed is not None else owner_ref, listed))
        current = listed
    return tuple(links)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an object belongs: the workload people know it by, and the object admission judged for it."""

    top: ObjectRef  # the top controller (Deployment, CronJob, …), or the object itself
    judged_as: ObjectRef  # the highest object of a kind the webhook judges: the admission message names it
    top_listed: bool = True


def place(obj: Observed, index: Mapping[str, Observed]) -> Placement:
    links = chain(obj, index)
    top, listed = links[-1]
    judged_as = next(ref for ref, _ in reversed(links) if ref.kind in POD_SPEC_PATHS)
    return Placement(top, judged_as, listed is not None)


def as_judged(obj: Observed, judged_as: ObjectRef) -> Workload:
    """A Pod's containers under the identity of the workload admission judged for it.

    ``Pod spec.containers[0]`` of a Deployment's Pod becomes ``Deployment …
    spec.template.spec.containers[0]``: the exact line a developer gets when applying that Deployment.
    """
    if judged_as.kind == obj.ref.kind and judged_as.name == obj.ref.name:
        return obj.workload
    own_prefix = ".".join(POD_SPEC_PATHS[obj.ref.kind])
    prefix = ".".join(POD_SPEC_PATHS[judged_as.kind])
    images = tuple(ContainerImage(prefix + c.field_path[len(own_prefix):], c.container, c.image)
                   for c in obj.workload.images)
    return replace(obj.workload, kind=judged_as.kind, name=judged_as.name, images=images)


# --- where a digest runs (trace) ---------------------------------------------------------------------

MAX_TRACED_PODS = 500


@dataclass(frozen=True, slots=True)
class RunningContainer:
    pod: str
    node: str
    container: str
    image: str
    since: str
    matched_by: str  # "image" (the Pod names the digest) or "imageID" (the runtime pulled it by a tag)


@dataclass(frozen=True)
class RunningWorkload:
    workload: ObjectRef
    containers: tuple[RunningContainer, ...]

    @property
    def since(self) -> str:
        return min((c.since for c in self.containers if c.since), default="")

    @property
    def pods(self) -> int:
        return len({c.pod for c in self.containers})


@dataclass(frozen=True)
class WhereItRuns:
    digest: str
    workloads: tuple[RunningWorkload, ...]
    observed_at: str
    pods_total: int = 0
    truncated: int = 0  # containers left out of the answer beyond MAX_TRACED_PODS pods


def where_it_runs(inventory: Inventory, digest: str, observed_at: str) -> WhereItRuns:
    """Every running container whose image names ``digest`` or whose runtime resolved a tag to it."""
    index = inventory.by_uid()
    found: dict[ObjectRef, list[RunningContainer]] = {}
    pods: set[tuple[str, str]] = set()
    truncated = 0
    for obj in inventory.objects:
        if not obj.runs:
            continue
        for image in obj.workload.images:
            matched = _matches(image, obj.resolved.get(image.container, ""), digest)
            if not matched:
                continue
            key = (obj.ref.namespace, obj.ref.name)
            if key not in pods and len(pods) >= MAX_TRACED_PODS:
                truncated += 1
                continue
            pods.add(key)
            top = place(obj, index).top
            found.setdefault(top, []).append(RunningContainer(obj.ref.name, obj.node, image.container, image.image,
                                                              obj.since(image.container), matched))
    ordered = sorted(found.items(), key=lambda item: (item[0].namespace, item[0].kind, item[0].name))
    return WhereItRuns(digest, tuple(RunningWorkload(ref, tuple(sorted(containers, key=lambda c: (c.pod, c.container))))
                                     for ref, containers in ordered), observed_at, len(pods), truncated)


def _matches(image: ContainerImage, resolved: str, digest: str) -> str:
    reference = references.classify(image.image).reference
    if reference is not None and reference.digest == digest:
        return "image"
    if resolved == digest:
        return "imageID"
    return ""


def where_json(answer: WhereItRuns) -> dict[str, Any]:
    """``GET /api/v1/running/<digest>`` and ``trace --output json``: where the digest runs now."""
    return {
        "digest": answer.digest,
        "observedAt": answer.observed_at,
        "pods": answer.pods_total,
        "truncated": answer.truncated,
        "workloads": [{
            "namespace": w.workload.namespace, "kind": w.workload.kind, "name": w.workload.name,
            "since": w.since, "pods": w.pods,
            "containers": [{"pod": c.pod, "node": c.node, "container": c.container, "image": c.image,
                            "since": c.since, "matchedBy": c.matched_by} for c in w.containers],
        } for w in answer.workloads],
    }


def where_lines(data: Mapping[str, Any]) -> Iterator[str]:
    """The text of ``trace``'s "running now" section, from :func:`where_json`'s shape."""
    found = data.get("workloads") or []
    if not found:
        yield f"running now: nowhere (no running Pod uses {data.get('digest')}; observed {data.get('observedAt')})"
        return
    yield f"running now (observed {data.get('observedAt')}): {data.get('pods')} pod(s)"
    for workload in found:
        yield (f"  {workload['namespace']}: {workload['kind']} {workload['name']}, {workload['pods']} pod(s) "
               f"since {workload['since'] or 'unknown'}")
        for container in workload["containers"]:
            how = "" if container["matchedBy"] == "image" else f' (tag "{container["image"]}" resolved to it)'
            node = f" on {container['node']}" if container["node"] else ""
            yield f"      pod {container['pod']}{node}, container \"{container['container']}\" since " \
                  f"{container['since'] or 'unknown'}{how}"
    if data.get("truncated"):
        yield f"  … and {data['truncated']} more container(s) in pods not listed"

