"""Where the CLI reads and writes records: a Promotion Gate server (HTTP API) or a local store.

:func:`open_backend` is the one place a command gets its backend; both kinds answer in the ledger's
typed outcomes and the API's JSON shapes, so every command renders one kind of answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import click
import requests

from webhook import ledger, record_json
from webhook.cli.options import BackendOptions, load_policy
from webhook.core import dsse
from webhook.core.policy import Policy
from webhook.core.promotion import (
    Lookup,
    Promotion,
    PromotionStatus,
    RecordView,
    Subject,
    TagPromotion,
    TagSubject,
)
from webhook.core.records import RecordKind
from webhook.store import SqlStore, StoreError, open_store
from webhook.store.sql import MAX_LOCAL_EVENT_CHARS, AuditQuery

MAX_TOKEN_BYTES = 4096
MAX_PAGE_EVENTS = 1000  # what the server answers at most per request
TAGS_PER_REQUEST = 100  # the API's limit for GET /api/v1/promoted


class BackendError(RuntimeError):
    """The server or store could not be reached (exit status 3)."""


class BackendRefused(BackendError):
    """The server understood and refused (401, 403, 404, 4xx): exit status 1."""


class BackendRejectedInput(BackendError):
    """The server could not use what was sent (a write answered 404, 413, …): exit status 2."""


class Backend(Protocol):
    def submit(self, envelope: dsse.Envelope, expect: Mapping[str, str]) -> ledger.SubmitOutcome: ...
    def environments(self) -> list[str]: ...
    def records(self, **filters: Any) -> list[dict[str, Any]]: ...
    def trace(self, digest: str) -> dict[str, Any]: ...
    def audit(self, *, limit: int, **filters: Any) -> Iterator[dict[str, Any]]: ...
    def record_view(self) -> RecordView: ...
    def tag_promotions(self, tags: Sequence[TagSubject], environment: str) -> dict[TagSubject, TagPromotion]: ...
    def running(self, digest: str) -> dict[str, Any] | None:
        """Where the digest runs now, if this backend can say (``None``: ask the cluster yourself)."""
        ...


def read_token(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise BackendError(f"--token-file {path}: {exc.strerror}") from exc
    if len(data) > MAX_TOKEN_BYTES:
        raise BackendError(f"--token-file {path}: larger than {MAX_TOKEN_BYTES} bytes")
    token = data.decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise BackendError(f"--token-file {path}: must hold one token on one line")
    return token


def _outcome(status: int, body: Mapping[str, Any]) -> ledger.SubmitOutcome:
    """The server's answer to a submission, read back into the ledger's outcome (the inverse of the API's)."""
    error = str(body.get("error", body))
    if status == 201:
        return ledger.Stored(str(body.get("id", "")), int(body.get("seq", 0)), RecordKind(str(body.get("kind"))),
                             str(body.get("repository", "")), str(body.get("digest", "")),
                             str(body.get("environment", "")))
    if status == 409:
        return ledger.Duplicate(str(body.get("id", "")), error)
    if status == 422:
        return ledger.Refused(str(body.get("rule", "")), error)
    if status == 400:
        return ledger.Malformed(error)
    if status == 403:
        return ledger.Forbidden(error)
    if status == 401:
        raise BackendRefused(f"{status}: {error}")
    raise BackendRejectedInput(f"{status}: {error}")


@dataclass
class HttpBackend:
    server: str
    token: str | None
    ca_file: Path | None
    timeout: float = 15.0

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        verify: str | bool = str(self.ca_file) if self.ca_file else True
        try:
            return requests.request(method, self.server.rstrip("/") + path, headers=headers, verify=verify,
                                    timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise BackendError(f"cannot reach {self.server}: {exc.__class__.__name__}: {exc}") from exc

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise BackendError(f"{self.server} answered {response.status_code} without JSON") from exc
        if not isinstance(data, dict):
            raise BackendError(f"{self.server} answered with unexpected JSON")
        return data

    def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._request("GET", path, params={k: v for k, v in (params or {}).items() if v is not None})
        data = self._json(response)
        if 400 <= response.status_code < 500:
            raise BackendRefused(f"{self.server}: {response.status_code} {data.get('error', '')}")
        if response.status_code >= 500:
            raise BackendError(f"{self.server}: {response.status_code} {data.get('error', '')}")
        return data

    def submit(self, envelope: dsse.Envelope, expect: Mapping[str, str]) -> ledger.SubmitOutcome:
        response = self._request("POST", "/api/v1/records",
                                 json={"envelope": envelope.to_json(), "expect": dict(expect)})
        if response.status_code >= 500:
            raise BackendError(f"{self.server}: {response.status_code} {response.text[:200]}")
        return _outcome(response.status_code, self._json(response))

    def environments(self) -> list[str]:
        return list(self._get("/api/v1/environments")["environments"])

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/records", filters)["records"])

    def trace(self, digest: str) -> dict[str, Any]:
        return self._get(f"/api/v1/trace/{digest}")

    def status(self, image: str) -> dict[str, Any]:
        return self._get("/api/v1/status", {"image": image})

    def running(self, digest: str) -> dict[str, Any] | None:
        """``GET /api/v1/running/<digest>``; a server without cluster access answers 404 (``None``)."""
        response = self._request("GET", f"/api/v1/running/{digest}")
        data = self._json(response)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise BackendError(f"{self.server}: {response.status_code} {data.get('error', '')}")
        return data

    def audit(self, *, limit: int, **filters: Any) -> Iterator[dict[str, Any]]:
        """Events page by page (the server answers at most 1000 and 8 MiB at a time), up to ``limit``."""
        after = 0
        while limit > 0:
            page = self._get("/api/v1/audit", {**filters, "limit": min(limit, MAX_PAGE_EVENTS), "after": after})
            events = page.get("events")
            if not isinstance(events, list):
                raise BackendError(f"{self.server} answered with unexpected JSON")
            yield from events[:limit]
            limit -= len(events)
            following = page.get("next")
            if not events or not isinstance(following, int) or following <= after:
                return
            after = following

    def record_view(self) -> RecordView:
        return ServerRecordView(self)

    def tag_promotions(self, tags: Sequence[TagSubject], environment: str) -> dict[TagSubject, TagPromotion]:
        answers: dict[TagSubject, TagPromotion] = {}
        unique = list(dict.fromkeys(tags))
        for start in range(0, len(unique), TAGS_PER_REQUEST):
            batch = unique[start:start + TAGS_PER_REQUEST]
            data = self._get("/api/v1/promoted", {"environment": environment,
                                                  "image": [f"{r}:{t}" for r, t in batch]})
            images = data.get("images")
            if not isinstance(images, list) or len(images) != len(batch):
                raise BackendError(f"{self.server} answered GET /api/v1/promoted with unexpected JSON")
            for asked, item in zip(batch, images, strict=True):
                answers[asked] = record_json.tag_promotion_of(item if isinstance(item, dict) else {})
        return answers


class LocalBackend:
    """A store opened in this process, seen through the policy's rules (what the server would do)."""

    def __init__(self, records: ledger.Ledger, identity: str) -> None:
        self.ledger = records
        self.identity = identity

    def submit(self, envelope: dsse.Envelope, expect: Mapping[str, str]) -> ledger.SubmitOutcome:
        try:
            return self.ledger.submit(envelope.to_json(), self.identity, lambda _env: True, expect)
        except StoreError as exc:
            raise BackendError(str(exc)) from exc

    def environments(self) -> list[str]:
        return list(self.ledger.policy.environment_names)

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        return [record_json.stored_json(s, signers=self.ledger.signers(s)) for s in self.ledger.find(**filters)]

    def trace(self, digest: str) -> dict[str, Any]:
        return record_json.trace_json(self.ledger.trace(digest, max_event_chars=MAX_LOCAL_EVENT_CHARS))

    def audit(self, *, limit: int, **filters: Any) -> Iterator[dict[str, Any]]:
        """Streamed from the store: one event in memory at a time, whatever the size of the log."""
        hits = self.ledger.store.query_audit(AuditQuery(**filters), max_event_chars=MAX_LOCAL_EVENT_CHARS)
        for hit in itertools.islice(hits, limit):
            yield record_json.event_json(hit)

    def record_view(self) -> RecordView:
        return LedgerRecordView(self.ledger)

    def tag_promotions(self, tags: Sequence[TagSubject], environment: str) -> dict[TagSubject, TagPromotion]:
        try:
            return dict(self.ledger.lookup([], list(dict.fromkeys(tags)), environment).tags)
        except StoreError as exc:
            raise BackendError(str(exc)) from exc

    def running(self, digest: str) -> dict[str, Any] | None:
        return None  # a store knows records, not the cluster


def open_local_store(url: str) -> SqlStore:
    """Open and migrate a store for a command; an unusable store is a :class:`BackendError` (exit 3)."""
    try:
        return open_store(url, migrate=True)
    except StoreError as exc:
        raise BackendError(str(exc)) from exc


def open_backend(options: BackendOptions, *, identity: str = "", policy: Policy | None = None) -> Backend:
    """The backend a command's options name: exactly one of ``--server`` and ``--store``."""
    if bool(options.server) == bool(options.store):
        raise BackendError("give exactly one of --server URL or --store URL")
    if options.server:
        return HttpBackend(options.server, read_token(options.token_file) if options.token_file else None,
                           options.ca_file)
    if options.policy_path is None and policy is None:
        raise click.UsageError("--store needs --policy: the promotion rules come from the policy file")
    assert options.store is not None
    records = ledger.Ledger(open_local_store(options.store), policy or load_policy(options.policy_path))
    return LocalBackend(records, identity or "local")


class LedgerRecordView:
    """``check --store``: the store's records evaluated in this process, as admission would."""

    def __init__(self, records: ledger.Ledger) -> None:
        self._ledger = records

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        try:
            return self._ledger.lookup(subjects, tags, environment)
        except StoreError as exc:
            return Lookup({s: PromotionStatus(Promotion.UNAVAILABLE, detail=str(exc)[:160]) for s in subjects})


class ServerRecordView:
    """``check --server``: the server's verdicts, read from ``GET /api/v1/status`` and ``/promoted``."""

    def __init__(self, backend: HttpBackend) -> None:
        self._backend = backend

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        statuses = {subject: self._status(*subject, environment) for subject in subjects}
        try:
            answers = self._backend.tag_promotions(tags, environment) if tags else {}
        except BackendError:
            answers = {}  # without an answer the plain mutable-tag finding stands
        return Lookup(statuses, answers)

    def _status(self, repository: str, digest: str, environment: str) -> PromotionStatus:
        try:
            states = self._backend.status(f"{repository}@{digest}")["states"]
        except BackendError as exc:
            return PromotionStatus(Promotion.UNAVAILABLE, detail=str(exc)[:160])
        state = states.get(environment)
        if state is None:
            return PromotionStatus(Promotion.NOT_PROMOTED)
        return PromotionStatus(Promotion(state["state"]), tuple(state["records"]), tuple(state["promotedTo"]),
                               state.get("detail", ""), state.get("revokedFrom", ""))
