"""AdmissionReview ``admission.k8s.io/v1``: parse the request at the edge, build the response."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core.errors import InvalidInput
from webhook.core.fields import FieldReader

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
MAX_WARNING_CHARS = 120
MAX_WARNINGS_TOTAL = 4000  # the API server ignores warnings past 4096 characters from all sources


class MalformedReview(InvalidInput):
    """The body is not an AdmissionReview we can answer; the message names the problem."""


@dataclass(frozen=True, slots=True)
class UserInfo:
    username: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionRequest:
    uid: str
    group: str  # the API group of request.kind ("" for the core group)
    kind: str
    namespace: str
    name: str
    operation: str
    sub_resource: str
    user: UserInfo
    object: Mapping[str, Any] | None
    old_object: Mapping[str, Any] | None
    dry_run: bool


_read = FieldReader(MalformedReview)


def parse_review(body: Any) -> AdmissionRequest:
    if not isinstance(body, Mapping):
        raise MalformedReview("body must be a JSON object (an AdmissionReview)")
    api_version = body.get("apiVersion")
    kind = body.get("kind")
    if api_version != API_VERSION or kind != KIND:
        raise MalformedReview(
            f"expected apiVersion {API_VERSION!r} and kind {KIND!r}, got {api_version!r} and {kind!r}"
        )
    request = body.get("request")
    if not isinstance(request, Mapping):
        raise MalformedReview("request is required and must be an object")
    uid = _read.text(request.get("uid"), "request.uid", required=True)
    if not uid:
        raise MalformedReview("request.uid must not be empty")
    operation = _read.text(request.get("operation"), "request.operation", required=True)
    if operation not in OPERATIONS:
        raise MalformedReview(f"request.operation must be one of {', '.join(OPERATIONS)}")
    gvk = request.get("kind")
    if not isinstance(gvk, Mapping):
        raise MalformedReview("request.kind is required and must be an object")
    kind_name = _read.text(gvk.get("kind"), "request.kind.kind", required=True)
    user_info = _read.mapping(request.get("userInfo") or None, "request.userInfo")
    groups = _read.strings(user_info.get("groups") or None, "request.userInfo.groups")
    dry_run = request.get("dryRun", False)
    if dry_run is None:
        dry_run = False
    if not isinstance(dry_run, bool):
        raise MalformedReview("request.dryRun must be a boolean")
    obj = _read.nullable_mapping(request.get("object"), "request.object")
    if obj is None and operation in ("CREATE", "UPDATE"):
        # The API server always sends the object being written; without it there is nothing to judge,
        # and answering "allowed" would admit what was never seen.
        raise MalformedReview(f"request.object is required for {operation}")
    return AdmissionRequest(
        uid=uid,
        group=_read.text(gvk.get("group"), "request.kind.group"),
        kind=kind_name,
        namespace=_read.text(request.get("namespace"), "request.namespace"),
        name=_read.text(request.get("name"), "request.name"),
        operation=operation,
        sub_resource=_read.text(request.get("subResource"), "request.subResource"),
        user=UserInfo(_read.text(user_info.get("username"), "request.userInfo.username"), groups),
        object=obj,
        old_object=_read.nullable_mapping(request.get("oldObject"), "request.oldObject"),
        dry_run=dry_run,
    )


def fit_warnings(lines: list[str]) -> list[str]:
    """Keep each warning short and the total under the API server's budget."""
    fitted: list[str] = []
    total = 0
    for line in lines:
        text = line if len(line) <= MAX_WARNING_CHARS else line[: MAX_WARNING_CHARS - 1] + "…"
        if total + len(text) > MAX_WARNINGS_TOTAL:
            fitted.append(f"{len(lines) - len(fitted)} more findings not shown; see the audit log")
            break
        fitted.append(text)
        total += len(text)
    return fitted


def build_response(
    uid: str, *, allowed: bool, message: str = "", warnings: list[str] | None = None,
    audit_annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    if warnings:
        response["warnings"] = fit_warnings(warnings)
    if audit_annotations:
        response["auditAnnotations"] = dict(audit_annotations)
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
