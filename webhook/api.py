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

from webhook import dsse, promotion_rules, records, references
from webhook.policy import ApiToken, Policy
from webhook.store.errors import DuplicateRecord, StoreError, StoreUnavailable
from webhook.store.sql import SqlStore

if TYPE_CHECKING:
    from webhook.server import Services

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


def stored_json(stored: promotion_rules.StoredRecord, *, with_envelope: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"id": stored.id, "seq": stored.seq, "storedAt": stored.stored_at,
                            "submittedBy": stored.submitted_by, **records.record_json(stored.record),
                            "signers": [s.keyid for s in stored.envelope.signatures]}
    if with_envelope:
        data["envelope"] = stored.envelope.to_json()
    return data


def status_json(store: SqlStore, policy: Policy, ref: references.ImageReference) -> dict[str, Any]:
    """The promotion state of one pinned image in every environment (``GET /status``, ``check``)."""
    assert ref.digest is not None
    states = promotion_rules.evaluate(policy, store.records_for_digest(ref.digest), ref.repository, ref.digest)
    return {"repository": ref.repository, "digest": ref.digest, "states": {
        env: {"state": s.state.value, "records": list(s.record_ids), "promotedTo": list(s.promoted_to),
              "detail": s.detail} for env, s in states.items()}}


def trace_json(store: SqlStore, policy: Policy, digest: str) -> dict[str, Any]:
    stored = store.records_for_digest(digest)
    repositories = sorted({s.record.repository for s in stored})
    states = {}
    for repository in repositories:
        evaluated = promotion_rules.evaluate(policy, stored, repository, digest)
        states[repository] = {env: {"state": s.state.value, "records": list(s.record_ids), "detail": s.detail}
                              for env, s in evaluated.items()}
    return {
        "digest": digest,
        "records": [stored_json(s, with_envelope=False) for s in stored if s.record.kind == "promotion"],
        "revocations": [stored_json(s, with_envelope=False) for s in stored if s.record.kind == "revocation"],
        "states": states,
        "admissions": store.query_audit(digest=digest, limit=MAX_LIMIT),
    }


def submit(store: SqlStore, policy: Policy, body: Any, identity: str,
           may_write: Callable[[str], bool]) -> tuple[int, dict[str, Any]]:
    """Parse, authorise, check and store one envelope. Shared by the API and the operator."""
    try:
        envelope = dsse.parse(body.get("envelope", body) if isinstance(body, dict) and "payload" not in body
                              else body)
        record = records.parse_statement(envelope.payload)
    except (dsse.EnvelopeError, records.RecordError) as exc:
        return 400, {"error": f"malformed envelope: {exc}"}
    if not may_write(record.environment):
        return 403, {"error": f'identity "{identity}" may not write records for environment "{record.environment}"'}
    if isinstance(body, dict) and isinstance(body.get("expect"), dict):
        # A caller can bind the envelope to what it means to submit: a replayed envelope for another
        # digest or environment is refused instead of silently recording something else.
        expect = body["expect"]
        for field, actual in (("digest", record.digest), ("environment", record.environment),
                              ("repository", record.repository)):
            if field in expect and expect[field] != actual:
                return 422, {"error": f"envelope is for {field} {actual!r}, not {expect[field]!r}", "rule": "replay"}
    try:
        stored = store.add_record(policy, envelope, record, identity)
    except promotion_rules.RuleViolation as exc:
        return 422, {"error": str(exc), "rule": exc.rule}
    except DuplicateRecord as exc:
        return 409, {"error": str(exc), "id": exc.record_id}
    return 201, {"id": stored.id, "seq": stored.seq, "kind": record.kind, "repository": record.repository,
                 "digest": record.digest, "environment": record.environment}


def register(store: SqlStore) -> Callable[[Flask, Services], None]:
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

        @api.errorhandler(StoreUnavailable)
        def unavailable(exc: StoreUnavailable) -> Response:
            return _error(503, str(exc)[:200])

        @api.errorhandler(StoreError)
        def store_error(exc: StoreError) -> Response:
            return _error(503, f"store error: {str(exc)[:200]}")

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

            status, payload = submit(store, policy, body, token.identity, may_write)
            environment = payload.get("environment", "")
            metrics.records_ingested.labels(environment=environment, result=str(status)).inc()
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
            found = store.find_records(repository=repository, digest=digest,
                                       environment=request.args.get("environment"), limit=_limit(),
                                       after=int(after) if after.isdigit() else 0)
            return jsonify({"records": [stored_json(s) for s in found]})

        @api.get("/trace/<path:digest>")
        def trace(digest: str) -> Response:
            if not references.is_digest(digest):
                return _error(400, f"digest {digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
            return jsonify(trace_json(store, policy, digest))

        @api.get("/status")
        def status() -> Response:
            image = request.args.get("image", "")
            try:
                ref = references.parse(image)
            except references.InvalidReference as exc:
                return _error(400, f"image: {exc}")
            if ref.digest is None:
                return _error(400, "image must be pinned by digest (repository@sha256:…)")
            return jsonify(status_json(store, policy, ref))

        @api.get("/audit")
        def audit_events() -> Response:
            allowed_arg = request.args.get("allowed")
            events = store.query_audit(
                since=request.args.get("since"), until=request.args.get("until"),
                namespace=request.args.get("namespace"), user=request.args.get("user"),
                digest=request.args.get("digest"), reason=request.args.get("reason"),
                allowed=None if allowed_arg is None else allowed_arg.lower() == "true", limit=_limit())
            return jsonify({"events": events})

        app.register_blueprint(api)

    return attach
