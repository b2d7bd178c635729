"""The Promotion operator's decisions against a real store (SQLite and PostgreSQL), its certificate plan,
and its command line. The same operator against a real API server: tests/e2e/test_operator.py.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from cryptography import x509

from tools.promotion_kit import DIGEST, IMAGE, REPOSITORY, Kit, ci_record, envelope, make_kit
from webhook import policy_file as policy_mod
from webhook.cli import operator as cli_operator
from webhook.cluster_access import KubeAccess
from webhook.core import keys, promotion_rules, records
from webhook.core.records import RecordKind
from webhook.ledger import Ledger
from webhook.operator import audit_anchor
from webhook.operator import certificates as tls_rotation
from webhook.operator import promotions as op
from webhook.operator.certificates import SecretAction
from webhook.operator.promotions import Phase
from webhook.store import SqlStore, open_store
from webhook.store.audit_chain import AnchorOutcome
from webhook.store.audit_format import Checkpoint, Sealer

CREATED = "2026-11-25T10:00:00Z"
OTHER_DIGEST = "sha256:" + "b" * 64
CI_EVIDENCE: dict[str, Any] = {
    "gitCommit": "4f2c9e1", "gitRepository": "github.com/acme/payment-api", "ciRunId": "run-8812",
    "ciRunUrl": "https://ci.example/run/8812", "testsPassed": 120, "testsFailed": 0,
    "scan": {"scanner": "trivy", "critical": 0, "high": 0, "medium": 3}, "reason": "build 8812",
}


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


@pytest.fixture
def policy(kit: Kit) -> policy_mod.Policy:
    return policy_mod.load(kit.policy_path)


def promotion(environment: str = "ci", *, image: str = IMAGE, evidence: Mapping[str, Any] | None = None,
              envelope_json: str | None = None, name: str | None = None,
              generation: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Promotion's spec and metadata as the API server stores them."""
    spec: dict[str, Any] = {"image": image, "environment": environment}
    if evidence is not None:
        spec["evidence"] = dict(evidence)
    if envelope_json is not None:
        spec["envelope"] = envelope_json
    name = name or f"payment-api-{environment}"
    meta = {"namespace": "payments", "name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
            "generation": generation, "creationTimestamp": CREATED}
    return spec, meta


Reconcile = Callable[..., op.Outcome | None]


@pytest.fixture
def reconcile(store: SqlStore, policy: policy_mod.Policy, kit: Kit) -> Reconcile:
    """The operator's handler logic with the kit's ``ci`` key as the operator key (ci and staging trust it)."""
    def run(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any] | None = None, *,
            signer: keys.SigningKey | str | None = "ci", on: SqlStore | None = None) -> op.Outcome | None:
        key = kit.signing_key(signer) if isinstance(signer, str) else signer
        return op.reconcile(spec, meta, status or {}, records_ledger=Ledger(on or store, policy), signer=key)
    return run


def unreachable_store() -> SqlStore:
    return open_store("postgresql://nobody@127.0.0.1:1/promotion_gate")


def recorded(reconcile: Reconcile, environment: str, **kwargs: Any) -> op.Outcome:
    outcome = reconcile(*promotion(environment, **{"evidence": CI_EVIDENCE, **kwargs}))
    assert outcome is not None and outcome.phase == Phase.RECORDED, outcome
    return outcome


# --- recording -------------------------------------------------------------------------------------


def test_a_valid_ci_promotion_is_recorded(reconcile: Reconcile, store: SqlStore, kit: Kit) -> None:
    spec, meta = promotion("ci", evidence=CI_EVIDENCE)
    outcome = reconcile(spec, meta)
    assert outcome is not None
    assert outcome.status() == {"phase": "Recorded", "reason": f'{IMAGE} recorded for environment "ci"',
                                "recordId": outcome.record_id, "observedGeneration": 1}
    (stored,) = store.find_records(digest=DIGEST)
    assert stored.id == outcome.record_id
    assert stored.submitted_by == "kubernetes:payments/payment-api-ci"
    assert [s.keyid for s in stored.envelope.signatures] == [kit.signing_key("ci").key_id]
    assert stored.record == records.Record(
        kind=RecordKind.PROMOTION, repository=REPOSITORY, digest=DIGEST, environment="ci", at=CREATED,
        by="kubernetes:payments/payment-api-ci",
        source=records.Source("4f2c9e1", "github.com/acme/payment-api", "run-8812", "https://ci.example/run/8812"),
        tests=records.Tests(120, 0), scan=records.Scan("trivy", {"critical": 0, "high": 0, "medium": 3}),
        reason=f"build 8812 (Promotion payments/payment-api-ci uid {meta['uid']} generation 1)")


def test_a_restart_re_signs_the_same_record(reconcile: Reconcile, store: SqlStore) -> None:
    spec, meta = promotion("ci", evidence=CI_EVIDENCE)
    first = reconcile(spec, meta)
    assert first is not None and first.record_id
    # The operator stopped after storing but before writing status: it signs again, gets a duplicate.
    again = reconcile(spec, meta, {})
    assert again == op.Outcome(Phase.RECORDED, f'{IMAGE} was already recorded for environment "ci"', 1, first.record_id)
    assert store.record_count() == 1
    # Status already says Recorded for this generation: the store is not even asked.
    assert reconcile(spec, meta, first.status(), on=unreachable_store()) is None
    # A new generation (the spec was edited) is a new record.
    edited = {**spec, "evidence": {**CI_EVIDENCE, "reason": "rebuilt"}}
    newer = reconcile(edited, {**meta, "generation": 2}, first.status())
    assert newer is not None and newer.phase == Phase.RECORDED and newer.record_id != first.record_id
    assert store.record_count() == 2


def test_the_record_is_deterministic_per_object_and_generation(policy: policy_mod.Policy) -> None:
    spec, meta = promotion("staging", evidence=CI_EVIDENCE)
    first = records.payload(op.build_record(spec, meta, policy))
    assert records.payload(op.build_record(spec, meta, policy)) == first
    assert records.payload(op.build_record(spec, {**meta, "uid": "another"}, policy)) != first
    assert records.payload(op.build_record(spec, {**meta, "generation": 2}, policy)) != first
    assert op.build_record(spec, meta, policy).promoted_from == "ci"  # the previous environment of the policy


def test_a_long_reason_is_shortened_to_fit_the_record(reconcile: Reconcile, store: SqlStore) -> None:
    outcome = recorded(reconcile, "ci", evidence={**CI_EVIDENCE, "reason": "x" * 4096})
    (stored,) = store.find_records(digest=DIGEST)
    assert outcome.record_id == stored.id
    assert len(stored.record.reason) == records.MAX_TEXT
    assert stored.record.reason.endswith("generation 1)")


# --- the promotion rules decide; status carries the store's exact words ----------------------------


def test_production_with_the_operator_key_alone_is_rejected(reconcile: Reconcile, store: SqlStore,
                                                            policy: policy_mod.Policy) -> None:
    recorded(reconcile, "ci")
    recorded(reconcile, "staging")
    outcome = reconcile(*promotion("production", evidence=CI_EVIDENCE))
    production = policy.environment("production")
    assert production is not None
    trusted = ", ".join(promotion_rules.short(k) for k in sorted(production.trusted_key_ids))
    assert outcome == op.Outcome(
        Phase.REJECTED, 'rule signatures: environment "production" requires 2 signature(s) from distinct trusted '
                     f"keys, found 0 (trusted keys: {trusted})", 1)
    assert outcome.status()["recordId"] is None  # a stale id from an earlier generation is removed
    assert store.record_count() == 2


def test_production_with_an_envelope_signed_by_two_approvers_is_recorded(reconcile: Reconcile, store: SqlStore,
                                                                        kit: Kit) -> None:
    recorded(reconcile, "ci")
    recorded(reconcile, "staging")
    signed = envelope(kit, ci_record(environment="production", promoted_from="staging", approvers=("alice", "bob")),
                      "release", "approver-a")
    outcome = reconcile(*promotion("production", envelope_json=signed.dumps()))
    assert outcome == op.Outcome(Phase.RECORDED, f'{IMAGE} recorded for environment "production"', 1,
                                 records.record_id(signed))
    # The same envelope again (a restart, or a second object carrying it) is the same record.
    again = reconcile(*promotion("production", envelope_json=signed.dumps(), name="copy"))
    assert again is not None and (again.phase, again.record_id) == (Phase.RECORDED, records.record_id(signed))
    assert store.record_count() == 3


@pytest.mark.parametrize(("environment", "changes", "reason"), [
    ("staging", {}, f'rule requirePrevious: {REPOSITORY}@{DIGEST} has no valid record in "ci"; promote it to "ci" '
                    "first (no skipping)"),
    ("ci", {"testsFailed": 2}, 'rule evidence.maxTestsFailed: "ci" allows at most 0 failed tests; the record has 2'),
    ("ci", {"scan": {"scanner": "trivy", "critical": 1, "high": 0}},
     'rule evidence.maxScanFindings.critical: "ci" allows at most 0 critical scan findings; the record has 1'),
    ("ci", {"ciRunId": None}, 'rule evidence.requireSource: "ci" requires the source git commit and CI run id'),
    ("qa", {}, 'rule environment: environment "qa" is not defined in the policy (defined: ci, staging, production)'),
])
def test_rule_violations_are_rejected_with_the_stores_reason(reconcile: Reconcile, store: SqlStore, environment: str,
                                                             changes: dict[str, Any], reason: str) -> None:
    outcome = reconcile(*promotion(environment, evidence={**CI_EVIDENCE, **changes}))
    assert outcome == op.Outcome(Phase.REJECTED, reason, 1)
    assert store.record_count() == 0


# --- envelopes: replay protection -------------------------------------------------------------------


@pytest.mark.parametrize(("record", "environment", "reason"), [
    (ci_record(digest=OTHER_DIGEST), "ci", f"envelope is for digest '{OTHER_DIGEST}', not '{DIGEST}'"),
    (ci_record(), "staging", "envelope is for environment 'ci', not 'staging'"),
    (ci_record(repository="ghcr.io/acme/other"), "ci",
     f"envelope is for repository 'ghcr.io/acme/other', not '{REPOSITORY}'"),
])
def test_an_envelope_for_something_else_is_rejected(reconcile: Reconcile, store: SqlStore, kit: Kit,
                                                    record: records.Record, environment: str, reason: str) -> None:
    outcome = reconcile(*promotion(environment, envelope_json=envelope(kit, record, "ci").dumps()))
    assert outcome == op.Outcome(Phase.REJECTED, reason, 1)
    assert store.record_count() == 0


def test_an_envelope_must_hold_a_promotion(reconcile: Reconcile, kit: Kit) -> None:
    revocation = records.Record(kind=RecordKind.REVOCATION, repository=REPOSITORY, digest=DIGEST, environment="ci", at=CREATED, by="ci-bot", reason="CVE")
    outcome = reconcile(*promotion("ci", envelope_json=envelope(kit, revocation, "ci").dumps()))
    assert outcome == op.Outcome(Phase.REJECTED, "spec.envelope holds a revocation record; a Promotion carries a "
                                              "promotion record (revoke with 'promotion-gate revoke')", 1)
    malformed = reconcile(*promotion("ci", envelope_json="{not json"))
    assert malformed == op.Outcome(Phase.REJECTED, "spec.envelope: malformed envelope: envelope is not valid JSON", 1)


def test_without_a_signing_key_only_envelopes_are_recorded(reconcile: Reconcile, kit: Kit) -> None:
    outcome = reconcile(*promotion("ci", evidence=CI_EVIDENCE), signer=None)
    assert outcome == op.Outcome(Phase.REJECTED, "spec.envelope is required: this operator has no signing key (--key), "
                                              "so it only stores pre-signed envelopes", 1)
    signed = envelope(kit, ci_record(), "ci")
    outcome = reconcile(*promotion("ci", envelope_json=signed.dumps()), signer=None)
    assert outcome is not None and outcome.phase == Phase.RECORDED


# --- the spec itself --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec_changes", "evidence_changes", "reason"), [
    ({"image": None}, {}, "spec.image is required: the image to promote, pinned by digest (repository@sha256:<digest>)"),
    ({"image": "ghcr.io/acme/payment-api:1.4"}, {},
     'spec.image "ghcr.io/acme/payment-api:1.4" is a tag, not a digest; a promotion is about one immutable build: '
     "use ghcr.io/acme/payment-api@sha256:<digest>"),
    ({"image": "ghcr.io/acme/payment-api"}, {},
     'spec.image "ghcr.io/acme/payment-api" has no digest; a promotion is about one immutable build: '
     "use ghcr.io/acme/payment-api@sha256:<digest>"),
    ({"image": "ghcr.io/acme/payment-api@sha256:abc"}, {},
     'spec.image "ghcr.io/acme/payment-api@sha256:abc" is not a valid image reference: sha256 digest must be '
     "exactly 64 lowercase hex characters (got 3)"),
    ({"environment": ""}, {},
     "spec.environment is required: the environment to promote to (defined: ci, staging, production)"),
    ({}, {"testsFailed": None}, "spec.evidence: give both testsPassed and testsFailed, not only testsPassed"),
    ({}, {"testsFailed": -1}, "spec.evidence.testsFailed must be a non-negative integer"),
    ({}, {"scan": {"critical": "none"}}, "spec.evidence.scan.critical must be a non-negative integer"),
    ({}, {"approvers": "alice"}, "spec.evidence.approvers must be a list of strings"),
    ({}, {"gitCommit": 42}, "spec.evidence.gitCommit must be a string"),
    ({"evidence": ["tests passed"]}, {}, "spec.evidence must be an object"),
])
def test_a_bad_spec_is_rejected_with_the_field_and_the_fix(reconcile: Reconcile, store: SqlStore,
                                                           spec_changes: dict[str, Any],
                                                           evidence_changes: dict[str, Any], reason: str) -> None:
    spec, meta = promotion("ci", evidence={**CI_EVIDENCE, **evidence_changes})
    spec.update(spec_changes)
    assert reconcile(spec, meta) == op.Outcome(Phase.REJECTED, reason, 1)
    assert store.record_count() == 0


# --- an unavailable store: Pending, kopf retries -----------------------------------------------------


def test_an_unreachable_store_leaves_the_promotion_pending(kit: Kit) -> None:
    policy = policy_mod.load(kit.policy_path)
    spec, meta = promotion("ci", evidence=CI_EVIDENCE)
    outcome = op.reconcile(spec, meta, {}, records_ledger=Ledger(unreachable_store(), policy),
                           signer=kit.signing_key("ci"))
    assert outcome is not None
    assert (outcome.phase, outcome.record_id, outcome.generation) == (Phase.PENDING, None, 1)
    assert outcome.reason.startswith("store unavailable, will retry: ")


# --- certificates: the decision table ----------------------------------------------------------------

SETTINGS = tls_rotation.CertificateSettings(namespace="promotion-gate", secret_name="promotion-gate-tls",
                                            service="promotion-gate", webhook_config="promotion-gate")
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def issued() -> dict[str, bytes]:
    return tls_rotation.material(SecretAction.CREATE, None, SETTINGS, NOW)


def _other_ca_serving(hosts: tuple[str, ...] = SETTINGS.hosts) -> tuple[bytes, bytes]:
    from webhook import certs

    ca, ca_key = certs.new_ca("someone else")
    return certs.issue(ca, ca_key, hosts)


def _wrong_hosts(data: dict[str, bytes]) -> dict[str, bytes]:
    from webhook import certs

    cert, key = certs.issue(data["ca.crt"], data["ca.key"], ("promotion-gate.default.svc",))
    return {**data, "tls.crt": cert, "tls.key": key}


SECRET_CASES: list[tuple[str, Callable[[dict[str, bytes]], dict[str, bytes] | None], dt.datetime, SecretAction,
                         str]] = [
    ("missing Secret", lambda d: None, NOW, SecretAction.CREATE, "the Secret does not exist"),
    ("Secret without the CA key", lambda d: {k: v for k, v in d.items() if k != "ca.key"}, NOW,
     SecretAction.CREATE, "the Secret lacks ca.key"),
    ("unreadable certificate", lambda d: {**d, "ca.crt": b"-----BEGIN CERTIFICATE-----\nxx\n"}, NOW,
     SecretAction.CREATE, "the Secret holds an unreadable certificate or key"),
    ("valid", lambda d: d, NOW, SecretAction.KEEP, "the serving certificate is valid until"),
    ("59 days into 90: still valid", lambda d: d, NOW + 59 * DAY, SecretAction.KEEP, "the serving certificate is valid"),
    ("61 days into 90: renew", lambda d: d, NOW + 61 * DAY, SecretAction.RENEW_SERVING,
     "the serving certificate expires"),
    ("expired serving certificate", lambda d: d, NOW + 100 * DAY, SecretAction.RENEW_SERVING,
     "the serving certificate expires"),
    ("serving certificate for other names", _wrong_hosts, NOW, SecretAction.RENEW_SERVING,
     "tls.crt does not name promotion-gate.promotion-gate.svc, promotion-gate.promotion-gate.svc.cluster.local"),
    ("serving certificate from another CA", lambda d: {**d, **dict(zip(("tls.crt", "tls.key"), _other_ca_serving(),
                                                                      strict=True))},
     NOW, SecretAction.RENEW_SERVING, "tls.crt is not signed by the CA in ca.crt"),
    ("key of another certificate", lambda d: {**d, "tls.key": _other_ca_serving()[1]}, NOW,
     SecretAction.RENEW_SERVING, "tls.key does not belong to tls.crt"),
    ("CA with less than a third of 10 years left", lambda d: d, NOW + 2500 * DAY, SecretAction.ROTATE_CA,
     "the CA expires"),
]


@pytest.mark.parametrize(("mutate", "now", "action", "reason"), [c[1:] for c in SECRET_CASES],
                         ids=[c[0] for c in SECRET_CASES])
def test_what_the_secret_needs(issued: dict[str, bytes], mutate: Callable[[dict[str, bytes]], dict[str, bytes] | None],
                               now: dt.datetime, action: SecretAction, reason: str) -> None:
    decided = tls_rotation.plan(mutate(dict(issued)), [issued["ca.crt"]], SETTINGS.hosts, now)
    assert decided.action is action
    assert decided.reason.startswith(reason)
    # A new CA must reach the webhook configuration; anything else leaves an in-sync bundle alone.
    assert decided.patch_ca_bundle is decided.changes_ca


@pytest.mark.parametrize(("bundles", "patch"), [
    ("in sync", False), ("drifted", True), ("one of two drifted", True), ("empty", True),
    ("no webhooks", False), ("no configuration", False),
])
def test_when_the_ca_bundle_is_patched(issued: dict[str, bytes], bundles: str, patch: bool) -> None:
    ca = issued["ca.crt"]
    current = {"in sync": [ca], "drifted": [b"old"], "one of two drifted": [ca, b"old"], "empty": [b""],
               "no webhooks": [], "no configuration": None}[bundles]
    decided = tls_rotation.plan(issued, current, SETTINGS.hosts, NOW)
    assert (decided.action, decided.patch_ca_bundle) == (SecretAction.KEEP, patch)


def test_a_new_secret_names_the_service(issued: dict[str, bytes]) -> None:
    assert sorted(issued) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    serving = x509.load_pem_x509_certificate(issued["tls.crt"])
    san = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(SETTINGS.hosts)
    assert serving.not_valid_after_utc - serving.not_valid_before_utc == 90 * DAY + dt.timedelta(minutes=5)
    ca = x509.load_pem_x509_certificate(issued["ca.crt"])
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == 3650 * DAY + dt.timedelta(minutes=5)


def test_long_service_and_namespace_names_fit_a_certificate() -> None:
    settings = tls_rotation.CertificateSettings(namespace="n" * 63, secret_name="tls", service="s" * 63,
                                                webhook_config="promotion-gate")
    data = tls_rotation.material(SecretAction.CREATE, None, settings, NOW)
    assert tls_rotation.plan(data, [data["ca.crt"]], settings.hosts, NOW).action is SecretAction.KEEP


def test_renewing_the_serving_certificate_keeps_the_ca(issued: dict[str, bytes]) -> None:
    later = NOW + 61 * DAY
    renewed = tls_rotation.material(SecretAction.RENEW_SERVING, issued, SETTINGS, later)
    assert (renewed["ca.crt"], renewed["ca.key"]) == (issued["ca.crt"], issued["ca.key"])
    assert renewed["tls.crt"] != issued["tls.crt"] and renewed["tls.key"] != issued["tls.key"]
    x509.load_pem_x509_certificate(renewed["tls.crt"]).verify_directly_issued_by(
        x509.load_pem_x509_certificate(issued["ca.crt"]))
    assert tls_rotation.plan(renewed, [issued["ca.crt"]], SETTINGS.hosts, NOW).action is SecretAction.KEEP


def test_a_rotated_ca_is_published_next_to_the_old_one(issued: dict[str, bytes]) -> None:
    rotated = tls_rotation.material(SecretAction.ROTATE_CA, issued, SETTINGS, NOW)
    new_ca, old_ca = x509.load_pem_x509_certificates(rotated["ca.crt"])
    assert old_ca == x509.load_pem_x509_certificate(issued["ca.crt"])
    assert rotated["ca.key"] != issued["ca.key"]
    x509.load_pem_x509_certificate(rotated["tls.crt"]).verify_directly_issued_by(new_ca)
    assert tls_rotation.plan(rotated, [rotated["ca.crt"]], SETTINGS.hosts, NOW) == tls_rotation.Plan(
        SecretAction.KEEP, tls_rotation.decide_secret(rotated, SETTINGS.hosts, NOW)[1], False)


# --- the command line: everything is checked before kopf starts --------------------------------------


def invoke(*args: str) -> Any:
    main = click.Group("promotion-gate")
    main.add_command(cli_operator.operator_command, "operator")
    return CliRunner().invoke(main, ["operator", *args], env={"PROMOTION_GATE_STORE": None,
                                                               "PROMOTION_GATE_POLICY": None,
                                                               "PROMOTION_GATE_OPERATOR_KEY": None})


def test_the_command_lists_its_options() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--store", "--policy", "--key", "--namespace-scope", "--manage-certificates", "--webhook-config",
                   "--tls-secret", "--service", "--namespace", "--peering / --standalone", "--liveness",
                   "--audit-anchor", "--audit-anchor-interval"):
        assert option in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "p.yaml"], "Missing option '--store'"),
    (["--store", "sqlite:///x.db"], "Missing option '--policy'"),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--key", "{kit}/missing.pem"],
     "Invalid value for --key: {kit}/missing.pem: cannot read key file: No such file or directory"),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/keys/ci.pem"],
     "Invalid value for --policy: {kit}/keys/ci.pem: the policy must be a YAML mapping with apiVersion and kind"),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--namespace-scope", "all,payments"],
     'Invalid value for --namespace-scope: "all" cannot be combined with namespaces'),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--namespace-scope", "Payments"],
     'Invalid value for --namespace-scope: "Payments" is not a namespace name or pattern'),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--key", "{kit}/keys/ci.pem",
      "--manage-certificates", "--tls-secret", "TLS"], 'Invalid value for --tls-secret: "TLS" is not a Kubernetes '
                                                       "object name"),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--audit-anchor", "anchor"],
     "Invalid value for --audit-anchor: the policy names no audit.checkpointKeys: the public keys whose signed "
     "checkpoints the anchor keeps"),
    (["--store", "sqlite:///x.db", "--policy", "{kit}/policy.yaml", "--audit-anchor", "Anchor"],
     'Invalid value for --audit-anchor: "Anchor" is not a Kubernetes object name'),
])
def test_bad_start_up_inputs_are_named(kit: Kit, args: list[str], message: str) -> None:
    result = invoke(*(a.format(kit=kit.root) for a in args))
    assert result.exit_code == 2, result.output
    assert message.format(kit=kit.root) in " ".join(result.output.split())


def test_a_policy_without_environments_is_refused(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("apiVersion: promotion-gate.io/v1\nkind: Policy\n")
    result = invoke("--store", "sqlite:///x.db", "--policy", str(policy_path))
    assert result.exit_code == 2
    assert "the policy defines no environments to promote to" in result.output


@pytest.mark.parametrize(("value", "namespaces"), [
    ("all", ()), ("payments-prod", ("payments-prod",)), ("payments-prod, payments-*", ("payments-prod", "payments-*")),
    ("!kube-*", ("!kube-*",)),
])
def test_namespace_scope(value: str, namespaces: tuple[str, ...]) -> None:
    assert cli_operator.parse_namespace_scope(value) == namespaces


def test_the_operators_own_namespace(tmp_path: Path) -> None:
    from_file = tmp_path / "namespace"
    from_file.write_text("platform\n")
    assert cli_operator.own_namespace("given", from_file) == "given"
    assert cli_operator.own_namespace(None, from_file) == "platform"
    assert cli_operator.own_namespace(None, tmp_path / "absent") == "promotion-gate"


@pytest.mark.parametrize(("option", "environ", "kubeconfig"), [
    ("/etc/kube.yaml", {"KUBECONFIG": "/other", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "/etc/kube.yaml"),
    (None, {"KUBECONFIG": "/other", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "/other"),
    (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),
    (None, {}, str(Path("~/.kube/config").expanduser())),
])
def test_how_the_api_server_is_reached(option: str | None, environ: dict[str, str], kubeconfig: str | None) -> None:
    assert cli_operator.kube_access(option, environ) == KubeAccess(kubeconfig)


def test_operator_starts_when_the_store_does_not_answer(caplog: pytest.LogCaptureFixture) -> None:
    # Certificates do not need the store: the operator keeps going and Promotions stay Pending.
    from tools.servers import free_port

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with caplog.at_level("WARNING"):
        store = cli_operator.open_store(url)
    assert store.dialect == "postgresql"
    assert "the store is unavailable" in caplog.text and "Promotions stay Pending until it answers" in caplog.text


# --- the audit log's external anchor: what the operator writes into its ConfigMap ---------------------


def _checkpoint(seq: int) -> Checkpoint:
    return Sealer(keys.generate("ed25519"), 100, 60).sign(seq=seq, prev_hash="0" * 64, kind="seal", event_seq=seq * 10,
                                                         event_hash="e" * 64, created_at="2026-11-25T10:00:00.000000Z")


def _data(checkpoint: Checkpoint, status: str = "") -> dict[str, str]:
    return {"checkpoint.json": json.dumps(checkpoint.to_json(), separators=(",", ":")),
            "status": status or f"anchored checkpoint {checkpoint.seq} (event {checkpoint.event_seq}, "
                                f"{checkpoint.created_at})"}


FIRST, SECOND = _checkpoint(1), _checkpoint(2)
ANCHOR_PLANS = {
    # ConfigMap data now, what the log says -> data to write (None: nothing), problem reported
    "no anchor yet, log has a checkpoint": (None, AnchorOutcome(FIRST), _data(FIRST), None),
    "no anchor yet, log has none": (None, AnchorOutcome(None), None, None),
    "the log moved on": (_data(FIRST), AnchorOutcome(SECOND), _data(SECOND), None),
    "nothing new": (_data(FIRST), AnchorOutcome(FIRST), None, None),
    "the log lost the anchor": (_data(FIRST), AnchorOutcome(FIRST, "gone"), _data(FIRST, "TAMPERED: gone"), "gone"),
    "still lost, reported already": (_data(FIRST, "TAMPERED: gone"), AnchorOutcome(FIRST, "gone"), None, "gone"),
}


@pytest.mark.parametrize(("data", "outcome", "written", "problem"), ANCHOR_PLANS.values(), ids=ANCHOR_PLANS.keys())
def test_what_the_operator_writes_into_the_audit_anchor(data: dict[str, str] | None, outcome: AnchorOutcome,
                                                        written: dict[str, str] | None, problem: str | None) -> None:
    assert audit_anchor.plan(data, outcome) == audit_anchor.Plan(written, problem)
