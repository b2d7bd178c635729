"""Where the CLI reads and writes records: a Promotion Gate server (HTTP API) or a local store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from webhook import api as api_mod
from webhook import dsse, references
from webhook.decision import Promotion, PromotionStatus, Subject
from webhook.policy import Policy
from webhook.store.errors import StoreError

MAX_TOKEN_BYTES = 4096


class BackendError(RuntimeError):
    """The server or store could not be reached (exit status 3)."""


class BackendRefused(BackendError):
    """The server understood and refused (401, 403, 404, 4xx): exit status 1."""


class Backend(Protocol):
    def submit(self, envelope: dsse.Envelope, expect: dict[str, str]) -> tuple[int, dict[str, Any]]: ...
    def environments(self) -> list[str]: ...
    def records(self, **filters: Any) -> list[dict[str, Any]]: ...
    def trace(self, digest: str) -> dict[str, Any]: ...
    def status(self, image: str) -> dict[str, Any]: ...
    def audit(self, **filters: Any) -> list[dict[str, Any]]: ...


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

    def submit(self, envelope: dsse.Envelope, expect: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = self._request("POST", "/api/v1/records", json={"envelope": envelope.to_json(), "expect": expect})
        if response.status_code >= 500:
            raise BackendError(f"{self.server}: {response.status_code} {response.text[:200]}")
        return response.status_code, self._json(response)

    def environments(self) -> list[str]:
        return list(self._get("/api/v1/environments")["environments"])

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/records", filters)["records"])

    def trace(self, digest: str) -> dict[str, Any]:
        return self._get(f"/api/v1/trace/{digest}")

    def status(self, image: str) -> dict[str, Any]:
        return self._get("/api/v1/status", {"image": image})

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/audit", filters)["events"])


class LocalBackend:
    def __init__(self, url: str, policy: Policy, identity: str) -> None:
        from webhook.store import open_store

        try:
            self.store = open_store(url)
            self.store.migrate()
        except StoreError as exc:
            raise BackendError(str(exc)) from exc
        self.policy = policy
        self.identity = identity

    def submit(self, envelope: dsse.Envelope, expect: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            return api_mod.submit(self.store, self.policy, {"envelope": envelope.to_json(), "expect": expect},
                                  self.identity, lambda _env: True)
        except StoreError as exc:
            raise BackendError(str(exc)) from exc

    def environments(self) -> list[str]:
        return list(self.policy.environment_names)

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        return [api_mod.stored_json(s) for s in self.store.find_records(**filters)]

    def trace(self, digest: str) -> dict[str, Any]:
        return api_mod.trace_json(self.store, self.policy, digest)

    def status(self, image: str) -> dict[str, Any]:
        return api_mod.status_json(self.store, self.policy, references.parse(image))

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        return self.store.query_audit(**filters)


def backend(*, server: str | None, token_file: Path | None, ca_file: Path | None, store: str | None,
            policy: Policy, identity: str = "") -> Backend:
    if bool(server) == bool(store):
        raise BackendError("give exactly one of --server URL or --store URL")
    if server:
        return HttpBackend(server, read_token(token_file) if token_file else None, ca_file)
    assert store is not None
    return LocalBackend(store, policy, identity or "local")


class BackendRecordView:
    """A RecordView for ``check --environment`` backed by the server's or store's verdicts."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        return {subject: self._status(*subject, environment) for subject in subjects}

    def _status(self, repository: str, digest: str, environment: str) -> PromotionStatus:
        try:
            states = self._backend.status(f"{repository}@{digest}")["states"]
        except BackendError as exc:
            return PromotionStatus(Promotion.UNAVAILABLE, detail=str(exc)[:160])
        state = states.get(environment)
        if state is None:
            return PromotionStatus(Promotion.NOT_PROMOTED)
        return PromotionStatus(Promotion(state["state"]), tuple(state["records"]), tuple(state["promotedTo"]),
                               state.get("detail", ""))


def record_view(*, server: str | None, token_file: Path | None, ca_file: Path | None, store: str | None,
                policy: Policy) -> BackendRecordView:
    return BackendRecordView(backend(server=server, token_file=token_file, ca_file=ca_file, store=store,
                                     policy=policy))
