"""The record API under ``/api/v1``: pipelines submit signed envelopes, people and tools read.

Authentication is by bearer token. Tokens are configured only as SHA-256 hashes and compared in
constant time against every configured hash, so neither the configuration nor the timing of a
refusal reveals a token. Authorisation is per identity: which environments it may write to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, g, jsonify, request

from webhook import ledger
from webhook.cluster_listing import ClusterError, RunningLookup
from webhook.core import dsse, references
from webhook.core.policy import ApiToken, Policy
from webhook.record_json import audit_chunks, outcome_json, status_json, stored_json, tag_promotion_json, trace_chunks
from webhook.running import where_json
from webhook.server import query
from webhook.store.errors import AuditTampered, StoreError
from webhook.store.sql import AuditQuery

if TYPE_CHECKING:
    from webhook.server.app import Services

MAX_LIMIT = 1000
MAX_TAGS = 100  # images one GET /promoted may ask about


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(policy: Policy, header: str | None) -> ApiToken | None:
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():  # auth schemes are case-insensitive (RFC 9110)
        return None
    presented = hash_token(credentials.strip())
    found: ApiToken | None = None
    for token in policy.api_tokens:  # no early exit: constant time in the number of tokens
        if hmac.compare_digest(presented, token.sha256):
            found = token
    return found


def _error(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, "code": status, **extra})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="promotion-gate"'
    return response


def _envelope_and_expectation(body: Any) -> tuple[Any, dict[str, Any] | None]:
    """The request body is the envelope itself, or ``{"envelope": …, "expect": {…}}``."""
    if isinstance(body, dict) and "payload" not in body:
        expect = body.get("expect")
        return body.get("envelope", body), expect if isinstance(expect, dict) else None
    return body, None


NO_CLUSTER_ACCESS = ("this server has no Kubernetes access, so it cannot say where a digest runs; run it with "
                     "--kubernetes (the chart does), or run 'promotion-gate trace' with a kubeconfig")


def register(records: ledger.Ledger, running: RunningLookup | None = None) -> Callable[[Flask, Services], None]:
    def attach(app: Flask, services: Services) -> None:
        policy = services.policy
        metrics = services.metrics
        api = Blueprint("api", __name__, url_prefix="/api/v1")

        @api.before_request
        def require_token() -> Response | None:
            token = authenticate(policy, request.headers.get("Authorization"))
            g.token = token
            if token is None and (request.method != "GET" or not policy.api_open_reads):
                if request.headers.get("Authorization"):
                    return _error(401, "invalid bearer token")
                return _error(401, "authentication required: send 'Authorization: Bearer <token>'")
            return None

        @api.errorhandler(StoreError)
        def store_error(exc: StoreError) -> Response:
            return _error(503, str(exc)[:200])

        @api.post("/records")
        def create_record() -> Response:
            token: ApiToken = g.token
            raw = request.get_data(cache=False)
            if len(raw) > dsse.MAX_ENVELOPE_BYTES:
                return _error(413, f"envelope is larger than {dsse.MAX_ENVELOPE_BYTES} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                return _error(400, "body is not valid JSON")

            def may_write(environment: str) -> bool:
                return token.admin or environment in token.environments

            envelope, expect = _envelope_and_expectation(body)
            outcome = records.submit(envelope, token.identity, may_write, expect)
            status, payload = outcome_json(outcome)
            # Only a stored record's environment (one the policy defines) becomes a label value.
            metrics.records_ingested.labels(environment=payload.get("environment", ""), result=str(status)).inc()
            response = jsonify({"code": status, **payload} if status >= 400 else payload)
            response.status_code = status
            return response

        @api.errorhandler(query.BadParameter)
        def bad_parameter(exc: query.BadParameter) -> Response:
            return _error(400, str(exc))

        def _limit() -> int:
            return query.whole_number(request.args, "limit", default=100, low=1, high=MAX_LIMIT)

        def _digest_arg(value: str | None) -> str | None:
            if value is not None and not references.is_digest(value):
                raise ValueError(f"digest {value!r} is not sha256:<64 hex> or sha512:<128 hex>")
            return value

        @api.get("/environments")
        def environments() -> Response:
            return jsonify({"environments": list(policy.environment_names)})

        @api.get("/records")
        def list_records() -> Response:
            limit = _limit()
            after = query.whole_number(request.args, "after", default=0, low=0, high=query.MAX_SEQ)
            environment = query.text(request.args, "environment")
            digest = query.text(request.args, "digest")
            repository = query.text(request.args, "repository")
            try:
                digest = _digest_arg(digest)
                if repository:
                    repository = references.parse(repository).repository
            except (ValueError, references.InvalidReference) as exc:
                return _error(400, str(exc))
            found = records.find(repository=repository, digest=digest, environment=environment, limit=limit,
                                 after=after)
            return jsonify({"records": [stored_json(s, signers=records.signers(s)) for s in found]})

        @api.get("/trace/<path:digest>")
        def trace(digest: str) -> Response:
            if not references.is_digest(digest):
                return _error(400, f"digest {digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
            return Response(trace_chunks(records.trace(digest)), mimetype="application/json")

        @api.get("/running/<path:digest>")
        def running_now(digest: str) -> Response:
            if not references.is_digest(digest):
                return _error(400, f"digest {digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
            if running is None:
                return _error(404, NO_CLUSTER_ACCESS)
            try:
                return jsonify(where_json(running.where(digest)))
            except ClusterError as exc:
                return _error(503, str(exc)[:300])

        @api.get("/status")
        def status() -> Response:
            image = query.text(request.args, "image") or ""
            try:
                ref = references.parse(image)
            except references.InvalidReference as exc:
                return _error(400, f"image: {exc}")
            if ref.digest is None:
                return _error(400, "image must be pinned by digest (repository@sha256:…)")
            return jsonify(status_json(ref.repository, ref.digest, records.status(ref)))

        @api.errorhandler(AuditTampered)
        def tampered(exc: AuditTampered) -> Response:
            return _error(409, f"audit log TAMPERED: {exc}; run 'promotion-gate audit verify'")

        @api.get("/promoted")
        def promoted() -> Response:
            environment = query.text(request.args, "environment") or ""
            if policy.environment(environment) is None:
                defined = ", ".join(policy.environment_names) or "none"
                return _error(400, f"environment: give one the policy defines ({defined})")
            images = request.args.getlist("image")
            if not images or len(images) > MAX_TAGS or any(len(i) > query.MAX_TEXT for i in images):
                return _error(400, f"image: give 1 to {MAX_TAGS} images as repository:tag")
            tags: list[tuple[str, str]] = []
            for image in images:
                try:
                    ref = references.parse(image)
                except references.InvalidReference as exc:
                    return _error(400, f"image {image[:200]!r}: {exc}")
                if ref.digest is not None:
                    return _error(400, f"image {image[:200]!r}: give a tag, not a digest")
                tags.append((ref.repository, ref.tag or "latest"))
            answers = records.lookup([], tags, environment).tags
            return jsonify({"environment": environment, "images": [
                tag_promotion_json(repository, tag, answers[(repository, tag)]) for repository, tag in tags]})

        @api.get("/audit")
        def audit_events() -> Response:
            args = request.args
            wanted = AuditQuery(
                since=query.text(args, "since"), until=query.text(args, "until"),
                namespace=query.text(args, "namespace"), user=query.text(args, "user"),
                digest=query.text(args, "digest"), reason=query.reason_code(args, "reason"),
                allowed=query.boolean(args, "allowed"))
            after = query.whole_number(args, "after", default=0, low=0, high=query.MAX_SEQ)
            page = records.store.audit_page(wanted, after=after, limit=_limit())
            return Response(audit_chunks(page), mimetype="application/json")

        app.register_blueprint(api)

    return attach
