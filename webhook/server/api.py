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
from webhook.record_json import outcome_json, status_json, stored_json, trace_json
from webhook.running import where_json
from webhook.store.errors import StoreError

if TYPE_CHECKING:
    from webhook.server.app import Services

MAX_LIMIT = 1000


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(policy: Policy, header: str | None) -> ApiToken | None:
    if not header or not header.startswith("Bearer "):
        return None
    presented = hash_token(header.removeprefix("Bearer ").strip())
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

        def _limit() -> int:
            try:
                return max(1, min(int(request.args.get("limit", "100")), MAX_LIMIT))
            except ValueError:
                return 100

        def _digest_arg(value: str | None) -> str | None:
            if value is not None and not references.is_digest(value):
                raise ValueError(f"digest {value!r} is not sha256:<64 hex> or sha512:<128 hex>")
            return value

        @api.get("/environments")
        def environments() -> Response:
            return jsonify({"environments": list(policy.environment_names)})

        @api.get("/records")
        def list_records() -> Response:
            try:
                digest = _digest_arg(request.args.get("digest"))
                repository = request.args.get("repository")
                if repository:
                    repository = references.parse(repository).repository
            except (ValueError, references.InvalidReference) as exc:
                return _error(400, str(exc))
            after = request.args.get("after", "0")
            found = records.find(repository=repository, digest=digest,
                                 environment=request.args.get("environment"), limit=_limit(),
                                 after=int(after) if after.isdigit() else 0)
            return jsonify({"records": [stored_json(s) for s in found]})

        @api.get("/trace/<path:digest>")
        def trace(digest: str) -> Response:
            if not references.is_digest(digest):
                return _error(400, f"digest {digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
            return jsonify(trace_json(records.trace(digest)))

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
            image = request.args.get("image", "")
            try:
                ref = references.parse(image)
            except references.InvalidReference as exc:
                return _error(400, f"image: {exc}")
            if ref.digest is None:
                return _error(400, "image must be pinned by digest (repository@sha256:…)")
            return jsonify(status_json(ref.repository, ref.digest, records.status(ref)))

        @api.get("/audit")
        def audit_events() -> Response:
            allowed_arg = request.args.get("allowed")
            events = records.store.query_audit(
                since=request.args.get("since"), until=request.args.get("until"),
                namespace=request.args.get("namespace"), user=request.args.get("user"),
                digest=request.args.get("digest"), reason=request.args.get("reason"),
                allowed=None if allowed_arg is None else allowed_arg.lower() == "true", limit=_limit())
            return jsonify({"events": events})

        app.register_blueprint(api)

    return attach
