"""Reading what runs from the Kubernetes API server: paginated lists, and list+watch caches.

The adapter between the API server and :mod:`webhook.running`. Every read is a *list* (or a watch
that follows one), never a GET per object, and is paged (``limit``/``continue``), decoded page by
page with orjson and cut down to :class:`webhook.running.Observed` at once, so memory holds one page
of raw JSON at a time. Each request has a deadline; a failure becomes a :class:`ClusterError` whose
message says what was asked of which server and what happened, for the CLI to print (exit 3) and for
the operator to log before it retries.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import urllib3

from webhook.running import (
    Inventory,
    NamespaceInfo,
    Observed,
    Unreadable,
    WhereItRuns,
    namespace_info,
    observe,
    where_it_runs,
)

log = logging.getLogger("promotion_gate.cluster")

PAGE_SIZE = 500  # kubectl's default chunk size
REQUEST_TIMEOUT = 30.0
WATCH_SECONDS = 300  # the server ends each watch after this; the client reconnects from the last version
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one watch event (the API server's own object limit is far smaller)
MAX_NOTES = 100  # unreadable objects reported per listing; the rest are counted


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str
    api: str  # the kubernetes client class
    plural: str

    @property
    def list_all(self) -> str:
        if self.kind in CLUSTER_SCOPED:
            return f"list_{_snake(self.kind)}"
        return f"list_{_snake(self.kind)}_for_all_namespaces"

    @property
    def list_namespaced(self) -> str:
        return f"list_namespaced_{_snake(self.kind)}"


CLUSTER_SCOPED = frozenset({"Namespace"})


def _snake(kind: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(kind))


POD = Resource("Pod", "v1", "CoreV1Api", "pods")
WORKLOADS = (
    Resource("Deployment", "apps/v1", "AppsV1Api", "deployments"),
    Resource("ReplicaSet", "apps/v1", "AppsV1Api", "replicasets"),
    Resource("StatefulSet", "apps/v1", "AppsV1Api", "statefulsets"),
    Resource("DaemonSet", "apps/v1", "AppsV1Api", "daemonsets"),
    Resource("Job", "batch/v1", "BatchV1Api", "jobs"),
    Resource("CronJob", "batch/v1", "BatchV1Api", "cronjobs"),
    Resource("ReplicationController", "v1", "CoreV1Api", "replicationcontrollers"),
)
RESOURCES = (*WORKLOADS, POD)  # Pods last: a Pod listed after its new ReplicaSet finds it
# Enough to name a Pod's workload: Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob.
OWNER_CHAIN = (WORKLOADS[1], WORKLOADS[4], POD)


class ClusterError(RuntimeError):
    """The API server could not be asked, did not answer in time, or refused (exit status 3)."""


class NamespaceNotFound(ClusterError):
    """A namespace named on the command line does not exist (exit status 2)."""


def describe(exc: BaseException, what: str, server: str, timeout: float) -> str:
    """What went wrong, in one line that names the request and the server."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        if exc.status == 0:
            reason = str(exc.reason or "").replace("\n", ": ")
            if "timed out" in reason:
                return f"the Kubernetes API server {server} did not answer within {timeout:g}s ({what})"
            return f"cannot talk to the Kubernetes API server {server} ({what}): {reason}"
        message = ""
        try:
            message = str(orjson.loads(exc.body or b"{}").get("message", ""))
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return f"the Kubernetes API server {server} answered {exc.status} {exc.reason} ({what})" + (
            f": {message}" if message else "")
    cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    if isinstance(cause, (TimeoutError, socket.timeout, urllib3.exceptions.TimeoutError)):
        return f"the Kubernetes API server {server} did not answer within {timeout:g}s ({what})"
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return f"cannot connect to the Kubernetes API server {server} ({what}): connection refused or unreachable"
    return f"cannot talk to the Kubernetes API server {server} ({what}): {type(cause).__name__}: {cause}"


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


def _api_errors() -> tuple[type[BaseException], ...]:
    from kubernetes.client.exceptions import ApiException

    return (ApiException, *TRANSPORT_ERRORS)


class _CollectorPause:
    """Pause Python's cycle collector while a listing decodes and keeps thousands of objects.

    Decoded JSON and the objects cut from it hold no reference cycles: reference counting frees them
    all the same, while the cycle collector would walk the growing inventory again and again (over
    half of a 10,000-Pod listing, measured). Nested and concurrent listings share one pause.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._resume = gc.isenabled()
                gc.disable()
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._resume:
                    gc.enable()


collector_paused = _CollectorPause()


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Lister:
    """Paginated lists through one API client; counts the requests it makes."""

    def __init__(self, api_client: Any, *, page_size: int = PAGE_SIZE, timeout: float = REQUEST_TIMEOUT) -> None:
        from kubernetes import client

        self._client = api_client
        self._apis = {name: getattr(client, name)(api_client) for name in ("CoreV1Api", "AppsV1Api", "BatchV1Api")}
        self.page_size = page_size
        self.timeout = timeout
        self.server = str(getattr(api_client.configuration, "host", "")) or "(unknown)"
        self.requests = 0

    def _call(self, what: str, method: Callable[..., Any], *, read_timeout: float | None = None, **kwargs: Any) -> Any:
        self.requests += 1
        timeout = (self.timeout, read_timeout or self.timeout)  # connecting includes the TLS handshake
        try:
            return method(_preload_content=False, _request_timeout=timeout, **kwargs)
        except _api_errors() as exc:
            raise ClusterError(describe(exc, what, self.server, self.timeout)) from exc

    def _decode(self, response: Any, what: str) -> dict[str, Any]:
        try:
            body = response.data
        except TRANSPORT_ERRORS as exc:
            raise ClusterError(describe(exc, what, self.server, self.timeout)) from exc
        finally:
            response.release_conn()
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ClusterError(f"the Kubernetes API server {self.server} answered {what} with invalid JSON") from exc
        if not isinstance(decoded, dict):
            raise ClusterError(f"the Kubernetes API server {self.server} answered {what} with unexpected JSON")
        return decoded

    def pages(self, resource: Resource, namespace: str | None = None) -> Iterator[tuple[list[Any], str]]:
        """Each page's items and the list's resourceVersion; an expired continue token restarts once."""
        from kubernetes.client.exceptions import ApiException

        api = self._apis[resource.api]
        method = getattr(api, resource.list_namespaced if namespace else resource.list_all)
        args: dict[str, Any] = {"namespace": namespace} if namespace else {}
        what = f"list {resource.plural}" + (f" in namespace {namespace}" if namespace else "")
        token: str | None = None
        restarts = 0
        while True:
            try:
                response = self._call(what, method, limit=self.page_size, _continue=token, **args)
            except ClusterError as exc:
                cause = exc.__cause__
                if isinstance(cause, ApiException) and cause.status == 410 and token and restarts < 1:
                    # The snapshot behind the continue token expired (a very long list): start over once.
                    restarts, token = restarts + 1, None
                    continue
                raise
            page = self._decode(response, what)
            items = page.get("items")
            metadata = _mapping(page.get("metadata"))
            yield (items if isinstance(items, list) else []), str(metadata.get("resourceVersion", ""))
            token = metadata.get("continue") or None
            if not token:
                return

    def observe_all(self, resource: Resource, namespace: str | None, inventory: Inventory) -> None:
        for items, _ in self.pages(resource, namespace):
            for item in items:
                try:
                    inventory.objects.append(observe(item, kind=resource.kind, api_version=resource.api_version))
                except Unreadable as exc:
                    _note(inventory, str(exc))

    def namespace(self, name: str) -> NamespaceInfo | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._call(f"read namespace {name}", self._apis["CoreV1Api"].read_namespace, name=name)
        except ClusterError as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                return None
            raise
        return namespace_info(self._decode(response, f"read namespace {name}"))

    def inventory(self, namespaces: Sequence[str] = (), resources: Sequence[Resource] = RESOURCES) -> Inventory:
        """One consistent-enough picture: workloads, then Pods, then the namespaces they are in.

        Namespaces come last, so a namespace deleted while its objects were being listed is missing
        from them and its objects are reported as not judged, never judged under a stale label.
        """
        with collector_paused():
            return self._inventory(namespaces, resources)

    def _inventory(self, namespaces: Sequence[str], resources: Sequence[Resource]) -> Inventory:
        inventory = Inventory()
        started = self.requests
        if namespaces:
            for name in namespaces:
                info = self.namespace(name)
                if info is None:
                    raise NamespaceNotFound(f'namespace "{name}" does not exist')
                inventory.namespaces[name] = info
                for resource in resources:
                    self.observe_all(resource, name, inventory)
        else:
            for resource in resources:
                self.observe_all(resource, None, inventory)
            for items, _ in self.pages(NAMESPACE):
                for item in items:
                    info = namespace_info(item)
                    if info.name:
                        inventory.namespaces[info.name] = info
        inventory.requests = self.requests - started
        return inventory


def _note(inventory: Inventory, note: str) -> None:
    if len(inventory.notes) < MAX_NOTES:
        inventory.notes.append(note)
    elif len(inventory.notes) == MAX_NOTES:
        inventory.notes.append(f"more than {MAX_NOTES} objects could not be read; the rest are not listed here")


# --- list + watch caches (the operator) ---------------------------------------------------------------


def _lines(response: Any, limit: int = MAX_EVENT_BYTES) -> Iterator[bytes]:
    buffer = bytearray()
    for chunk in response.stream(amt=65536, decode_content=True):
        buffer.extend(chunk)
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            if line.strip():
                yield line
        if len(buffer) > limit:
            raise ClusterError(f"a watch event larger than {limit} bytes")


class _Expired(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def _watch_event(event: dict[str, Any], version: str, plural: str) -> tuple[Any, dict[str, Any], str]:
    """A watch event's type, object and the resource version to resume from; ERROR ends the watch."""
    kind = event.get("type")
    obj = _mapping(event.get("object"))
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise _Expired()
        raise ClusterError(f"watch of {plural} ended with an error: {obj.get('message', obj)}")
    return kind, obj, str(_mapping(obj.get("metadata")).get("resourceVersion") or version)


class WatchedResource:
    """One resource kind, cluster-wide: a paginated list, then a watch from its resourceVersion.

    Each listed object is cut down to an :class:`Observed` and kept by uid. On any failure it waits
    (1 s, doubling to 60 s) and lists again; it never stops on its own, so an unreachable or slow API
    server costs a log line per attempt, not a crash loop.
    """

    def __init__(self, lister: Lister, resource: Resource, on_change: Callable[[], None]) -> None:
        self._lister = lister
        self.resource = resource
        self._on_change = on_change
        self._objects: dict[str, Observed] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._response: Any = None
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource.plural}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        # Closing the response here would wait for the reading thread's lock; shutting the socket down
        # ends its blocked read at once, and the loop sees the stop flag.
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def objects(self) -> list[Observed]:
        with self._lock:
            return list(self._objects.values())

    def _list(self) -> str:
        fresh: dict[str, Observed] = {}
        version = ""
        unreadable = 0
        with collector_paused():
            for items, page_version in self._lister.pages(self.resource):
                version = page_version
                for item in items:
                    try:
                        observed = observe(item, kind=self.resource.kind, api_version=self.resource.api_version)
                    except Unreadable as exc:
                        unreadable += 1
                        if unreadable <= 5:
                            log.warning("%s", exc)
                        continue
                    fresh[observed.ref.uid] = observed
        with self._lock:
            self._objects = fresh
        self.synced.set()
        self._on_change()
        return version

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, obj, new_version = _watch_event(event, version, self.resource.plural)
        if kind == "BOOKMARK":
            return new_version
        uid = str(_mapping(obj.get("metadata")).get("uid", ""))
        if kind == "DELETED":
            with self._lock:
                self._objects.pop(uid, None)
        elif kind in ("ADDED", "MODIFIED"):
            try:
                observed = observe(obj, kind=self.resource.kind, api_version=self.resource.api_version)
            except Unreadable as exc:
                log.warning("%s", exc)
                with self._lock:
                    self._objects.pop(uid, None)
                return new_version
            with self._lock:
                self._objects[uid] = observed
        self._on_change()
        return new_version

    def _watch(self, version: str) -> str:
        api = self._lister._apis[self.resource.api]
        method = getattr(api, self.resource.list_all)
        self._response = response = self._lister._call(
            f"watch {self.resource.plural}", method, watch=True, resource_version=version,
            allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS, read_timeout=WATCH_SECONDS + 30)
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    break
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("watch of %s sent a line that is not JSON; listing again", self.resource.plural)
                    raise _Expired() from None
                if isinstance(event, dict):
                    version = self._apply(event, version)
        except TRANSPORT_ERRORS as exc:
            if not self._stop.is_set():
                raise ClusterError(describe(exc, f"watch {self.resource.plural}", self._lister.server,
                                            WATCH_SECONDS)) from exc
        finally:
            self._response = None
            response.release_conn()
        return version

    def _run(self) -> None:
        backoff = 1.0
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                    self.last_error = ""
                version = self._watch(version)
                backoff = 1.0
            except _Expired:
                version = ""
            except ClusterError as exc:
                if self._stop.is_set():
                    return
                self.last_error = str(exc)
                log.warning("%s; listing %s again in %.0fs", exc, self.resource.plural, backoff)
                version = ""
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
            except Exception:  # never let one bad event end the cache: log it, list again
                log.exception("the %s cache failed; listing again in %.0fs", self.resource.plural, backoff)
                version = ""
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)


NAMESPACE = Resource("Namespace", "v1", "CoreV1Api", "namespaces")


class ClusterCache:
    """Every Pod, workload and namespace of the cluster, kept current by list+watch.

    :meth:`snapshot` copies the current objects into an :class:`Inventory` for one scan without any
    request; ``changes`` counts the watch events seen, so the operator knows when to rescan.
    """

    def __init__(self, lister: Lister, resources: Sequence[Resource] = RESOURCES) -> None:
        self._lister = lister
        self.changes = 0
        self.changed = threading.Event()
        self._caches = [WatchedResource(lister, r, self._touch) for r in resources]
        self._namespaces = _NamespaceCache(lister, self._touch)

    def _touch(self) -> None:
        self.changes += 1
        self.changed.set()

    def start(self) -> ClusterCache:
        for cache in (*self._caches, self._namespaces):
            cache.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every watch; waits at most ``timeout`` in all (the threads are daemons: a hung read dies with us)."""
        for cache in (*self._caches, self._namespaces):
            cache.stop()
        deadline = time.monotonic() + timeout
        for cache in (*self._caches, self._namespaces):
            cache.join(max(0.0, deadline - time.monotonic()))

    @property
    def synced(self) -> bool:
        return all(c.synced.is_set() for c in (*self._caches, self._namespaces))

    def errors(self) -> list[str]:
        return [c.last_error for c in (*self._caches, self._namespaces) if c.last_error]

    @property
    def requests(self) -> int:
        return self._lister.requests

    def snapshot(self) -> Inventory:
        inventory = Inventory(namespaces=self._namespaces.current())
        for cache in self._caches:
            inventory.objects.extend(cache.objects())
        return inventory


class _NamespaceCache(WatchedResource):
    """Namespaces are not workloads: keep their names, environment labels and whether they terminate."""

    def __init__(self, lister: Lister, on_change: Callable[[], None]) -> None:
        super().__init__(lister, NAMESPACE, on_change)
        self._infos: dict[str, NamespaceInfo] = {}

    def current(self) -> dict[str, NamespaceInfo]:
        with self._lock:
            return dict(self._infos)

    def _list(self) -> str:
        fresh: dict[str, NamespaceInfo] = {}
        version = ""
        for items, page_version in self._lister.pages(self.resource):
            version = page_version
            for item in items:
                info = namespace_info(item)
                if info.name:
                    fresh[info.name] = info
        with self._lock:
            self._infos = fresh
        self.synced.set()
        self._on_change()
        return version

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, obj, new_version = _watch_event(event, version, "namespaces")
        if kind == "BOOKMARK":
            return new_version
        info = namespace_info(obj)
        with self._lock:
            if kind == "DELETED":
                self._infos.pop(info.name, None)
            elif info.name:
                self._infos[info.name] = info
        self._on_change()
        return new_version


# --- where a digest runs, for the record API -----------------------------------------------------------


class RunningLookup:
    """``GET /api/v1/running/<digest>``: one paginated listing per ``ttl`` seconds, shared by all requests.

    The endpoint is reachable by any reader of the record API, so its cost is bounded here: requests
    that arrive while a listing runs wait for it, and its result answers every digest for ``ttl``.
    """

    def __init__(self, make_lister: Callable[[], Lister], *, ttl: float = 15.0) -> None:
        self._make_lister = make_lister
        self._lister: Lister | None = None
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, str, Inventory] | None = None

    def where(self, digest: str) -> WhereItRuns:
        """Raises :class:`ClusterError` when the API server cannot be listed."""
        with self._lock:
            cached = self._cached
            if cached is None or time.monotonic() - cached[0] > self._ttl:
                if self._lister is None:
                    try:
                        self._lister = self._make_lister()
                    except Exception as exc:  # a kubeconfig or service account that cannot be read
                        raise ClusterError(f"cannot configure the Kubernetes client: {exc}") from exc
                inventory = self._lister.inventory(resources=OWNER_CHAIN)
                cached = self._cached = (time.monotonic(), now_rfc3339(), inventory)
        _, observed_at, inventory = cached
        return where_it_runs(inventory, digest, observed_at)
