"""The admission server: a thin Flask shell around the policy core.

JSON in, :func:`webhook.core.decision.decide` in the middle, JSON out. Every body gets an answer — a
verdict, or a 4xx with a JSON error naming the problem; an unexpected exception is answered with a
fail-closed denial rather than a 500, because a 500 would make the API server apply its
failurePolicy without telling anyone why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from webhook.core import decision, findings, workloads
from webhook.core import review as admission
from webhook.core.findings import Reason
from webhook.core.policy import Policy
from webhook.core.promotion import NoRecords, RecordView
from webhook.decision_log import DecisionLog, StdoutDecisionLog, audit_failure_verdict
from webhook.environments import EnvironmentResolver, StaticEnvironments
from webhook.metrics import Metrics
from webhook.server.connections import CLIENT_CERTIFICATE, MAX_BODY_BYTES

log = logging.getLogger("promotion_gate.server")
NO_CLIENT_CERTIFICATE = ("/validate needs a client certificate signed by the configured client CA "
                         "(--validate-client-ca); this endpoint is for the Kubernetes API server")


@dataclass(frozen=True)
class ValidateClients:
    """Who may call ``/validate``: anyone who reaches the port, or only holders of a client certificate."""

    required: bool = False
    names: frozenset[str] = frozenset()  # empty: any certificate the client CA signed

    def refusal(self, certificate: dict[str, Any] | None) -> str | None:
        if not self.required:
            return None
        if not certificate:
            return NO_CLIENT_CERTIFICATE
        if not self.names:
            return None
        presented = certificate_names(certificate)
        if presented & self.names:
            return None
        shown = ", ".join(sorted(presented)[:3]) or "no name"
        return f"client certificate ({shown[:200]}) is not one of the names allowed to call /validate"


def certificate_names(certificate: dict[str, Any]) -> set[str]:
    """The common names and DNS names of a certificate as ``ssl.SSLObject.getpeercert()`` gives it."""
    names = {str(value) for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {str(value) for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"}
    return names


@dataclass
class Services:
    """Everything the HTTP shell needs, built once at start-up and passed in."""

    policy: Policy
    environments: EnvironmentResolver
    records: RecordView = field(default_factory=NoRecords)
    decision_log: DecisionLog = field(default_factory=StdoutDecisionLog)
    metrics: Metrics = field(default_factory=Metrics)
    api: Callable[[Flask, Services], None] | None = None
    ready: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
    enable_baseline: bool = False
    validate_clients: ValidateClients = field(default_factory=ValidateClients)


def error(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, "code": status, **extra})
    response.status_code = status
    return response


def create_app(services: Services) -> Flask:
    app = Flask("promotion_gate")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    metrics = services.metrics
    metrics.ready.set(1)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = (f"request body is larger than {MAX_BODY_BYTES} bytes" if code == 413
                   else exc.description or exc.name)
        # Only known routes become label values: arbitrary paths from the network must not create series.
        endpoint = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.malformed.labels(endpoint=endpoint, code=str(code)).inc()
        return error(code, message)

    def read_json() -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        raw = request.get_data(cache=False)
        if len(raw) > MAX_BODY_BYTES:
            return error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            return orjson.loads(raw)  # orjson: strict UTF-8, bounded nesting, and ~5x faster than json
        except (ValueError, RecursionError):
            return error(400, "body is not valid JSON")

    @app.post("/validate")
    def validate() -> Response:
        started = time.perf_counter()
        refusal = services.validate_clients.refusal(request.environ.get(CLIENT_CERTIFICATE))
        if refusal is not None:
            metrics.malformed.labels(endpoint="/validate", code="403").inc()
            return error(403, refusal)
        body = read_json()
        if isinstance(body, Response):
            metrics.malformed.labels(endpoint="/validate", code=str(body.status_code)).inc()
            return body
        try:
            review = admission.parse_review(body)
        except admission.MalformedReview as exc:
            metrics.malformed.labels(endpoint="/validate", code="400").inc()
            return error(400, f"malformed AdmissionReview: {exc}")
        environment: str | None = None
        try:
            environment = services.environments.environment_of(review.namespace) if review.namespace else None
            verdict = decision.decide(review, services.policy, environment, services.records)
        except workloads.WorkloadShapeError as exc:
            metrics.malformed.labels(endpoint="/validate", code="400").inc()
            return error(400, f"malformed AdmissionReview: request.object: {exc}")
        except Exception:  # fail closed, never a 500
            log.exception("unexpected error while judging request %s", review.uid)
            finding = findings.internal_error(f"{review.kind} {review.namespace}/{review.name}")
            verdict = decision.Verdict(allowed=False, environment=environment, findings=(finding,),
                                       message=finding.line)
        try:
            verdict = services.decision_log.record(review, verdict)
        except Exception as exc:  # e.g. stdout gone: the policy decides, as for a store failure
            log.exception("decision %s could not be logged", review.uid)
            metrics.audit_errors.inc()
            verdict = audit_failure_verdict(verdict, services.policy.audit_on_write_failure, type(exc).__name__,
                                            reason=Reason.INTERNAL_ERROR)
        # Label values only from what the policy and the cluster define: a caller who makes up
        # environments or namespaces must not make up metric series.
        environment_label = verdict.environment if verdict.environment in services.policy.environment_names else ""
        for reason in verdict.reasons or ("none",):
            metrics.decisions.labels(
                environment=environment_label, mode=str(verdict.mode),
                allowed=str(verdict.allowed).lower(), reason=reason,
            ).inc()
        if verdict.break_glass_reason is not None:
            namespace_label = review.namespace if services.environments.known(review.namespace) else ""
            metrics.break_glass.labels(environment=environment_label, namespace=namespace_label).inc()
        payload = admission.build_response(
            review.uid, allowed=verdict.allowed, message=verdict.message, warnings=list(verdict.warnings),
        )
        metrics.request_latency.labels(result="allowed" if verdict.allowed else "denied").observe(
            time.perf_counter() - started
        )
        return Response(orjson.dumps(payload), mimetype="application/json")

    if services.enable_baseline:
        @app.post("/baseline/allow")
        def baseline_allow() -> Response:
            # Same stack (TLS, WSGI, JSON), no policy: the benchmark's yardstick.
            body = read_json()
            if isinstance(body, Response):
                return body
            try:
                review = admission.parse_review(body)
            except admission.MalformedReview as exc:
                return error(400, f"malformed AdmissionReview: {exc}")
            return Response(orjson.dumps(admission.build_response(review.uid, allowed=True)),
                            mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        ok, detail = services.ready()
        metrics.ready.set(1 if ok else 0)
        response = jsonify({"status": "ok" if ok else "not ready", "detail": detail})
        response.status_code = 200 if ok else 503
        return response

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    if services.api is not None:
        services.api(app, services)
    return app


def default_services(policy: Policy) -> Services:
    return Services(policy=policy, environments=StaticEnvironments(policy))
