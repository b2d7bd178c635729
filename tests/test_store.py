"""The attestation store on both backends (real SQLite files, a real PostgreSQL server)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tools.promotion_kit import DIGEST, REPOSITORY, Kit, ci_record, envelope, make_kit
from webhook import policy_file as policy
from webhook.core import dsse, promotion_rules, records
from webhook.core.policy import Policy
from webhook.core.promotion import Promotion, StoredRecord
from webhook.core.records import RecordKind, SignedRecord
from webhook.store import DuplicateRecord, SqlStore, open_store, schema


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "kit")


def rules(kit: Kit) -> Policy:
    return policy.load(kit.policy_path)


def store_record(store: SqlStore, rules: Policy, env: dsse.Envelope, record: records.Record) -> StoredRecord:
    """Append with the promotion rules as the acceptance check, as the ledger does."""
    return store.add_record(SignedRecord(env, record), "test",
                            lambda existing: promotion_rules.check_acceptance(rules, env, record, existing))


def add(store: SqlStore, kit: Kit, record: records.Record, *signers: str) -> StoredRecord:
    return store_record(store, rules(kit), envelope(kit, record, *signers), record)


def states(store: SqlStore, kit: Kit) -> dict[str, str]:
    evaluated = promotion_rules.evaluate(rules(kit), store.records_for_digest(DIGEST), REPOSITORY, DIGEST)
    return {env: s.state.value for env, s in evaluated.items()}


def staging(**changes: Any) -> records.Record:
    return ci_record(**{"environment": "staging", "promoted_from": "ci", **changes})


def production(**changes: Any) -> records.Record:
    return ci_record(**{"environment": "production", "promoted_from": "staging", "approvers": ("alice", "bob"),
                        **changes})


def test_seed_story_in_the_store(store: SqlStore, kit: Kit) -> None:
    add(store, kit, ci_record(), "ci")
    add(store, kit, staging(), "ci")
    assert states(store, kit) == {"ci": "promoted", "staging": "promoted", "production": "not-promoted"}
    with pytest.raises(promotion_rules.RuleViolation) as refused:
        add(store, kit, production(), "release")
    assert str(refused.value).startswith(
        'rule signatures: environment "production" requires 2 signature(s) from distinct trusted keys, found 1')
    add(store, kit, production(), "release", "approver-b")
    assert states(store, kit)["production"] == "promoted"
    revocation = records.Record(kind=RecordKind.REVOCATION, repository=REPOSITORY, digest=DIGEST, environment="production", at="2026-11-25T12:00:00Z", by="security", reason="CVE-2026-0001")
    add(store, kit, revocation, "release")
    assert states(store, kit) == {"ci": "promoted", "staging": "promoted", "production": "not-promoted"}


REFUSALS = {
    "unknown environment": (lambda: ci_record(environment="qa"), ("ci",), "environment",
                            'rule environment: environment "qa" is not defined in the policy (defined: ci, staging, '
                            "production)"),
    "failed tests": (lambda: ci_record(tests=records.Tests(10, 2)), ("ci",), "evidence.maxTestsFailed",
                     'rule evidence.maxTestsFailed: "ci" allows at most 0 failed tests; the record has 2'),
    "no tests": (lambda: ci_record(tests=None), ("ci",), "evidence.tests",
                 'rule evidence.tests: "ci" requires test results (tests passed/failed) in the record'),
    "critical finding": (lambda: ci_record(scan=records.Scan("trivy", {"critical": 1, "high": 0})), ("ci",),
                         "evidence.maxScanFindings.critical",
                         'rule evidence.maxScanFindings.critical: "ci" allows at most 0 critical scan findings; '
                         "the record has 1"),
    "no source": (lambda: ci_record(source=records.Source()), ("ci",), "evidence.requireSource",
                  'rule evidence.requireSource: "ci" requires the source git commit and CI run id'),
    "mis-keyed": (lambda: ci_record(), ("outsider",), "signatures",
                  'rule signatures: environment "ci" requires 1 signature(s) from distinct trusted keys, found 0 '
                  "(trusted keys: {ci})"),
    "skipping staging": (lambda: production(), ("release", "approver-a"), "requirePrevious", None),
    "wrong promotedFrom": (lambda: staging(promoted_from="ci-other"), ("ci",), "promotedFrom",
                           'rule promotedFrom: records for "staging" must be promoted from "ci", got "ci-other"'),
    "first env with promotedFrom": (lambda: ci_record(promoted_from="dev"), ("ci",), "promotedFrom",
                                    'rule promotedFrom: "ci" is the first environment; promotedFrom must be absent, '
                                    'got "dev"'),
    "revoking what was never promoted": (
        lambda: records.Record(kind=RecordKind.REVOCATION, repository=REPOSITORY, digest=DIGEST, environment="ci", at="t", by="x", reason="r"), ("ci",),
        "revocation", f'rule revocation: {REPOSITORY}@{DIGEST} was never promoted to "ci"; nothing to revoke'),
}


@pytest.mark.parametrize(("build", "signers", "rule", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_records_leave_nothing_written(store: SqlStore, kit: Kit, build, signers, rule, message) -> None:  # type: ignore[no-untyped-def]
    before = store.record_count()
    with pytest.raises(promotion_rules.RuleViolation) as refused:
        add(store, kit, build(), *signers)
    assert refused.value.rule == rule
    if message:
        assert str(refused.value) == message.replace("{ci}", kit.signing_key("ci").key_id[:12])
    assert store.record_count() == before


def test_skipping_an_environment_is_refused(store: SqlStore, kit: Kit) -> None:
    add(store, kit, ci_record(), "ci")
    with pytest.raises(promotion_rules.RuleViolation) as refused:
        add(store, kit, production(), "release", "approver-a")
    assert str(refused.value) == (f'rule requirePrevious: {REPOSITORY}@{DIGEST} has no valid record in "staging"; '
                                  'promote it to "staging" first (no skipping)')


def test_duplicate_envelope_is_refused(store: SqlStore, kit: Kit) -> None:
    record = ci_record()
    env = envelope(kit, record, "ci")
    store_record(store, rules(kit), env, record)
    with pytest.raises(DuplicateRecord):
        store_record(store, rules(kit), env, record)
    assert store.record_count() == 1


def test_one_key_signing_twice_counts_once(store: SqlStore, kit: Kit) -> None:
    add(store, kit, ci_record(), "ci")
    add(store, kit, staging(), "ci")
    record = production()
    env = envelope(kit, record, "release")
    doubled = dsse.Envelope(env.payload_type, env.payload, (*env.signatures, dsse.Signature("", env.signatures[0].sig)))
    with pytest.raises(promotion_rules.RuleViolation, match="found 1"):
        store_record(store, rules(kit), doubled, record)


def test_forged_payload_does_not_verify(store: SqlStore, kit: Kit) -> None:
    # Signed for one digest, payload edited to another: the signature no longer covers it.
    record = ci_record()
    env = envelope(kit, record, "ci")
    forged_record = ci_record(digest="sha256:" + "e" * 64)
    forged = dsse.Envelope(env.payload_type, records.payload(forged_record), env.signatures)
    with pytest.raises(promotion_rules.RuleViolation, match="found 0"):
        store_record(store, rules(kit), forged, forged_record)


def test_re_signed_by_an_untrusted_key_claiming_a_trusted_keyid(store: SqlStore, kit: Kit) -> None:
    record = ci_record()
    env = envelope(kit, record, "outsider")
    claimed = kit.signing_key("ci").key_id
    resigned = dsse.Envelope(env.payload_type, env.payload, (dsse.Signature(claimed, env.signatures[0].sig),))
    with pytest.raises(promotion_rules.RuleViolation, match="found 0"):
        store_record(store, rules(kit), resigned, record)


def test_key_removed_from_policy_makes_records_untrusted(store: SqlStore, kit: Kit, tmp_path: Path) -> None:
    add(store, kit, ci_record(), "ci")
    add(store, kit, staging(), "ci")
    document = yaml.safe_load(kit.policy_path.read_text())
    document["environments"][1]["trustedKeys"] = ["release"]  # ci key no longer trusted for staging
    stricter = policy.parse(document, base_dir=tmp_path)
    evaluated = promotion_rules.evaluate(stricter, store.records_for_digest(DIGEST), REPOSITORY, DIGEST)
    assert evaluated["staging"].state is Promotion.UNTRUSTED
    assert evaluated["staging"].detail.startswith('environment "staging" requires 1 signature(s) from distinct '
                                                  "trusted keys, found 0")


def test_revoking_staging_breaks_the_chain_to_production(store: SqlStore, kit: Kit) -> None:
    add(store, kit, ci_record(), "ci")
    add(store, kit, staging(), "ci")
    add(store, kit, production(), "release", "approver-a")
    add(store, kit, records.Record(kind=RecordKind.REVOCATION, repository=REPOSITORY, digest=DIGEST, environment="staging", at="t", by="sec", reason="r"), "ci")
    evaluated = promotion_rules.evaluate(rules(kit), store.records_for_digest(DIGEST), REPOSITORY, DIGEST)
    assert evaluated["production"].state is Promotion.NOT_PROMOTED
    assert evaluated["production"].revoked_from == "staging"


def test_records_are_append_only_in_the_database(store: SqlStore, kit: Kit) -> None:
    add(store, kit, ci_record(), "ci")
    for statement in ("UPDATE records SET environment = 'production'", "DELETE FROM records"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.write_engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert store.record_count() == 1


def test_migrations_are_idempotent(store_url: str) -> None:
    first = open_store(store_url)
    assert first.migrate() == first.migrate() == 5
    with first.engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version")).scalars().all()
    assert versions == [1, 2, 3, 4, 5]


def _shipped_records_table() -> sa.Table:
    """The records table as migrations 1 and 2 created it in stores made before migration 3."""
    return sa.Table(
        "records", sa.MetaData(),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False), sa.Column("repository", sa.String(512), nullable=False),
        sa.Column("digest", sa.String(140), nullable=False), sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("submitted_by", sa.String(256), nullable=False), sa.Column("envelope", sa.Text, nullable=False))


def test_a_store_made_before_tags_gets_them_and_keeps_its_records(store_url: str, kit: Kit) -> None:
    old = open_store(store_url)
    record = ci_record()
    with old.write_engine.begin() as conn:
        _shipped_records_table().create(conn)
        for table in (schema.audit_events, schema.audit_images, schema.audit_checkpoints):  # as migration 1 made them
            table.create(conn)
        conn.execute(sa.text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO schema_version VALUES (1), (2)"))
        signed = SignedRecord(envelope(kit, record, "ci"), record)
        conn.execute(_shipped_records_table().insert().values(
            id=signed.id, kind="promotion", repository=REPOSITORY, digest=DIGEST, environment="ci",
            recorded_at="2026-11-25T10:00:00Z", submitted_by="ci-bot", envelope=signed.envelope.dumps()))
        # the index by repository alone that migration 1 made then, which migration 5 drops
        conn.execute(sa.text("CREATE INDEX records_by_repository ON records (repository)"))
    assert old.migrate() == 5
    indexes = {i["name"] for i in sa.inspect(old.engine).get_indexes("records")}
    assert "records_by_repository_tag" in indexes and "records_by_repository" not in indexes
    tagged = ci_record(digest="sha256:" + "b" * 64, built_as="abc123")
    add(old, kit, tagged, "ci")
    found = old.records_for_subjects([DIGEST], [(REPOSITORY, "abc123")])
    assert {digest: [s.record.built_as for s in stored] for digest, stored in found.items()} == {
        DIGEST: [""], "sha256:" + "b" * 64: ["abc123"]}


def test_tags_are_looked_up_with_the_digests_in_one_query(store: SqlStore, kit: Kit) -> None:
    """The newest builds of a tag come back with every record of their digests; older builds do not."""
    builds = [f"sha256:{n:064x}" for n in range(1, 5)]
    for digest in builds:
        add(store, kit, ci_record(digest=digest, built_as="latest"), "ci")
    add(store, kit, staging(digest=builds[0]), "ci")
    add(store, kit, ci_record(digest=DIGEST), "ci")
    found = store.records_for_subjects([DIGEST], [(REPOSITORY, "latest")], builds_per_tag=2)
    assert {d: [s.record.environment for s in stored] for d, stored in found.items()} == {
        DIGEST: ["ci"], builds[3]: ["ci"], builds[2]: ["ci"]}
    older = store.records_for_subjects([], [(REPOSITORY, "latest"), ("ghcr.io/acme/other", "latest")])
    assert sorted(older) == builds and [s.record.environment for s in older[builds[0]]] == ["ci", "staging"]


def test_lookup_by_digest_and_environment_is_indexed(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            plan = " ".join(str(r) for r in conn.execute(sa.text(
                "EXPLAIN QUERY PLAN SELECT * FROM records WHERE digest = 'x'")))
        else:
            conn.execute(sa.text("SET enable_seqscan = off"))
            plan = " ".join(str(r) for r in conn.execute(sa.text(
                "EXPLAIN SELECT * FROM records WHERE digest = 'x'")))
    assert "records_by_digest_environment" in plan


def test_lookup_by_repository_and_tag_is_indexed(store: SqlStore) -> None:
    query = "SELECT digest FROM records WHERE repository = 'r' AND built_as = 't' ORDER BY seq DESC LIMIT 16"
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            plan = " ".join(str(r) for r in conn.execute(sa.text(f"EXPLAIN QUERY PLAN {query}")))
        else:
            conn.execute(sa.text("SET enable_seqscan = off"))
            plan = " ".join(str(r) for r in conn.execute(sa.text(f"EXPLAIN {query}")))
    assert "records_by_repository_tag" in plan


def test_envelope_verifies_with_securesystemslib(kit: Kit) -> None:
    """An independent DSSE implementation accepts our envelopes (both key types)."""
    from securesystemslib.dsse import Envelope as SslibEnvelope
    from securesystemslib.signer import Key, SSlibKey  # type: ignore[attr-defined]

    record = ci_record()
    env = envelope(kit, record, "ci", "approver-b")
    theirs = SslibEnvelope.from_dict(json.loads(env.dumps()))
    public_keys: list[Key] = [
        SSlibKey.from_crypto(kit.signing_key(name).verifying.public_key, keyid=kit.signing_key(name).key_id)
        for name in ("ci", "approver-b")
    ]
    verified = theirs.verify(public_keys, threshold=2)
    assert set(verified) == {kit.signing_key("ci").key_id, kit.signing_key("approver-b").key_id}
    assert json.loads(base64.b64decode(env.to_json()["payload"]))["predicateType"] == (
        "https://promotion-gate.io/promotion/v1")
