"""The record API over real HTTPS: authentication, authorisation, and hostile envelopes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tools.promotion_kit import DIGEST, Kit, ci_record, cli, envelope, make_kit
from tools.servers import RunningServer, free_port
from webhook.core.records import open_envelope
from webhook.store import open_store


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("api-kit"))


@pytest.fixture(scope="module")
def gate(kit: Kit, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tools.servers import start_server

    root = tmp_path_factory.mktemp("api")
    server = start_server(root, policy=kit.policy_path.read_text(), store=f"sqlite:///{root / 'store.db'}")
    yield server
    server.stop()


def post(gate: RunningServer, body: object, token: str | None, *, raw: bytes | None = None):  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    return gate.post("/api/v1/records", data=data, headers=headers)


def signed(kit: Kit, **changes: Any) -> dict[str, Any]:
    return envelope(kit, ci_record(**changes), "ci").to_json()


AUTH = {
    "no token": (None, 401, "authentication required: send 'Authorization: Bearer <token>'"),
    "wrong token": ("not-a-token", 401, "invalid bearer token"),
    "reader may not write": ("reader", 403, 'identity "reader" may not write records for environment "ci"'),
    "release-bot may not write ci": ("release-bot", 403,
                                     'identity "release-bot" may not write records for environment "ci"'),
}


@pytest.mark.parametrize(("identity", "status", "message"), AUTH.values(), ids=AUTH.keys())
def test_authorisation_refusals(gate: RunningServer, kit: Kit, identity: str | None, status: int, message: str) -> None:
    token = kit.token(identity) if identity in ("reader", "release-bot") else identity
    reply = post(gate, signed(kit, digest="sha256:" + "1" * 64), token)
    assert reply.status_code == status
    assert reply.json()["error"] == message
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="promotion-gate"'


@pytest.mark.parametrize("path", ["/api/v1/records", f"/api/v1/trace/{DIGEST}", "/api/v1/audit",
                                  "/api/v1/environments"])
def test_reads_need_a_token(gate: RunningServer, kit: Kit, path: str) -> None:
    assert gate.get(path).status_code == 401
    ok = gate.get(path, headers={"Authorization": f"Bearer {kit.token('reader')}"})
    assert ok.status_code == 200


def test_created_duplicate_and_replayed(gate: RunningServer, kit: Kit) -> None:
    token = kit.token("ci-bot")
    body = signed(kit, digest="sha256:" + "2" * 64)
    created = post(gate, body, token)
    assert created.status_code == 201
    assert set(created.json()) == {"id", "seq", "kind", "repository", "digest", "environment"}
    duplicate = post(gate, body, token)
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == f"record {created.json()['id']} is already stored"
    # Replay: the same envelope presented as if it were for another digest or environment.
    for expect, message in (({"digest": "sha256:" + "3" * 64}, f"envelope is for digest 'sha256:{'2' * 64}', not "
                                                                 f"'sha256:{'3' * 64}'"),
                            ({"environment": "staging"}, "envelope is for environment 'ci', not 'staging'")):
        replay = post(gate, {"envelope": body, "expect": expect}, token)
        assert replay.status_code == 422
        assert replay.json()["error"] == message


def tamper(kit: Kit, mutate) -> dict:  # type: ignore[no-untyped-def,type-arg]
    body = signed(kit, digest="sha256:" + "4" * 64)
    mutate(body)
    return body


MALFORMED = {
    "not json": (b"{", 400, "body is not valid JSON"),
    "array": (b"[]", 400, "malformed envelope: envelope must be a JSON object with payloadType, payload and signatures"),
    "wrong payloadType": (lambda k: tamper(k, lambda b: b.update(payloadType="text/plain")), 400,
                          "malformed envelope: envelope payloadType must be 'application/vnd.in-toto+json', got "
                          "'text/plain'"),
    "payload not base64": (lambda k: tamper(k, lambda b: b.update(payload="%%%")), 400,
                           "malformed envelope: envelope payload is not valid base64"),
    "no signatures": (lambda k: tamper(k, lambda b: b.update(signatures=[])), 400,
                      "malformed envelope: envelope signatures must be a non-empty list"),
    "too many signatures": (lambda k: tamper(k, lambda b: b.update(signatures=b["signatures"] * 17)), 400,
                            "malformed envelope: envelope has more than 16 signatures"),
    "payload not a statement": (lambda k: tamper(k, lambda b: b.update(payload=base64.b64encode(b"[1]").decode())),
                                400, "malformed envelope: statement must be an object"),
    "two subjects": (lambda k: tamper(k, lambda b: b.update(payload=base64.b64encode(json.dumps({
        "_type": "https://in-toto.io/Statement/v1", "predicateType": "https://promotion-gate.io/promotion/v1",
        "subject": [{}, {}], "predicate": {}}).encode()).decode())), 400,
        "malformed envelope: statement must have exactly one subject (one image digest per record)"),
    "uppercase digest": (lambda k: tamper(k, lambda b: b.update(payload=base64.b64encode(json.dumps({
        "_type": "https://in-toto.io/Statement/v1", "predicateType": "https://promotion-gate.io/promotion/v1",
        "subject": [{"name": "ghcr.io/acme/api", "digest": {"sha256": "A" * 64}}], "predicate": {}}).encode()
    ).decode())), 400, "malformed envelope: subject[0].digest must be sha256 (64 lowercase hex) or sha512 (128)"),
    "digest with a trailing newline": (lambda k: tamper(k, lambda b: b.update(payload=base64.b64encode(json.dumps({
        "_type": "https://in-toto.io/Statement/v1", "predicateType": "https://promotion-gate.io/promotion/v1",
        "subject": [{"name": "ghcr.io/acme/api", "digest": {"sha256": "a" * 64 + "\n"}}], "predicate": {}}).encode()
    ).decode())), 400, "malformed envelope: subject[0].digest must be sha256 (64 lowercase hex) or sha512 (128)"),
    "a tag that is not one": (lambda k: with_predicate(k, builtAs="-abc"), 400,
                              'malformed envelope: predicate.builtAs must be a tag: letters, digits, "_", "." and "-", '
                              'at most 128 characters, not starting with "." or "-"'),
    "a tag with a forged line": (lambda k: with_predicate(k, builtAs="abc\n[mutable-tag] x"), 400,
                                 'malformed envelope: predicate.builtAs must be a tag: letters, digits, "_", "." and '
                                 '"-", at most 128 characters, not starting with "." or "-"'),
    "a confirmation of an unknown field": (lambda k: with_predicate(k, confirmedByImageLabels=["scan"]), 400,
                                           "malformed envelope: predicate.confirmedByImageLabels: unknown source field "
                                           "'scan' (known: gitCommit, ciRunId, repository)"),
    "a confirmation of an absent field": (
        lambda k: with_predicate(k, source={"gitCommit": "c"}, confirmedByImageLabels=["ciRunId"]), 400,
        "malformed envelope: predicate.confirmedByImageLabels: ciRunId is confirmed but predicate.source.ciRunId is "
        "empty"),
}


def with_predicate(kit: Kit, **fields: Any) -> dict[str, Any]:
    """A CI record, signed, whose predicate carries ``fields`` as given."""
    from webhook.core import dsse, records

    statement = records.statement(ci_record(digest="sha256:" + "5" * 64))
    statement["predicate"].update(fields)
    payload = json.dumps(statement).encode()
    return dsse.sign(payload, [kit.signing_key("ci")]).to_json()


@pytest.mark.parametrize(("body", "status", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_envelopes(gate: RunningServer, kit: Kit, body, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = body if isinstance(body, bytes) else json.dumps(body(kit)).encode()
    reply = post(gate, None, kit.token("ci-bot"), raw=raw)
    assert reply.status_code == status
    assert reply.json()["error"] == message


def test_oversized_envelope_is_413(gate: RunningServer, kit: Kit) -> None:
    reply = post(gate, None, kit.token("ci-bot"), raw=b'{"payload": "' + b"A" * 300_000 + b'"}')
    assert reply.status_code == 413
    assert reply.json()["error"] == "envelope is larger than 262144 bytes"


def test_query_by_repository_digest_and_environment(gate: RunningServer, kit: Kit) -> None:
    token = kit.token("ci-bot")
    post(gate, signed(kit, digest="sha256:" + "5" * 64, repository="ghcr.io/acme/other"), token)
    auth = {"Authorization": f"Bearer {kit.token('reader')}"}
    by_repo = gate.get("/api/v1/records", params={"repository": "ghcr.io/acme/other"}, headers=auth).json()
    assert [r["digest"] for r in by_repo["records"]] == ["sha256:" + "5" * 64]
    by_digest = gate.get("/api/v1/records", params={"digest": "sha256:" + "5" * 64, "environment": "ci"},
                         headers=auth).json()
    assert len(by_digest["records"]) == 1
    assert by_digest["records"][0]["envelope"]["payloadType"] == "application/vnd.in-toto+json"
    bad = gate.get("/api/v1/records", params={"digest": "sha256:xyz"}, headers=auth)
    assert bad.status_code == 400
    assert bad.json()["error"] == "digest 'sha256:xyz' is not sha256:<64 hex> or sha512:<128 hex>"


@pytest.mark.parametrize("command", [["history", "ghcr.io/acme/api"], ["trace", DIGEST], ["audit"]])
def test_cli_refused_by_the_server_exits_1(gate: RunningServer, tmp_path: Path, command: list[str]) -> None:
    token = tmp_path / "wrong.token"
    token.write_text("not-a-token\n")
    result = cli(*command, "--server", gate.url, "--token-file", str(token), "--ca-file", str(gate.ca))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {gate.url}: 401 invalid bearer token"


def test_cli_unreachable_server_exits_3(tmp_path: Path) -> None:
    result = cli("history", "ghcr.io/acme/api", "--server", f"https://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach https://127.0.0.1:")


def test_a_lone_surrogate_is_refused_at_ingest_and_what_is_stored_always_prints(gate: RunningServer, kit: Kit) -> None:
    digest = "sha256:" + "d" * 64
    hostile = ci_record(digest=digest, by="ci\ud800bot", approvers=("alice",))  # JSON escapes it as \ud800
    reply = post(gate, envelope(kit, hostile, "ci").to_json(), kit.token("ci-bot"))
    assert (reply.status_code, reply.json()["error"]) == (
        400, "malformed envelope: statement: predicate.promotedBy holds an unpaired UTF-16 surrogate (an escape such "
             "as \\ud800 without its pair), which is not Unicode text")

    # A record stored before that check existed: every output still works, the surrogate escaped.
    store_url = f"sqlite:///{gate.log_path.parent / 'store.db'}"
    store = open_store(store_url)
    store.add_record(open_envelope(envelope(kit, hostile, "ci").to_json()), "ci-bot", lambda _: None)
    store.close()
    remote = ["--server", gate.url, "--token-file", str(kit.token_file("reader")), "--ca-file", str(gate.ca)]
    local = ["--store", store_url, "--policy", str(kit.policy_path)]
    for args in (["trace", digest], ["history", f"ghcr.io/acme/payment-api@{digest}"]):
        for backend in (remote, local):
            shown = cli(*args, *backend)
            assert shown.returncode == 0, shown.stderr
            assert f"@{digest} -> ci by ci\\ud800bot (record " in shown.stdout
        as_json = cli(*args, *remote, "--output", "json")
        assert as_json.returncode == 0 and "ci\\ud800bot" in as_json.stdout


@pytest.mark.parametrize("after", ["\u00b2", "9" * 5000, str(2**100), "-1", "1.5"])
def test_audit_paging_takes_only_a_sequence_number(gate: RunningServer, kit: Kit, after: str) -> None:
    reply = gate.get("/api/v1/audit", params={"after": after}, headers={"Authorization": f"Bearer {kit.token('reader')}"})
    assert (reply.status_code, reply.json()) == (
        400, {"error": "after must be a whole number from 0 to 9223372036854775807", "code": 400})


@pytest.mark.parametrize(("params", "message"), [
    ({"image": "ghcr.io/acme/api:1"}, "environment: give one the policy defines (ci, staging, production)"),
    ({"environment": "staging"}, "image: give 1 to 100 images as repository:tag"),
    ({"environment": "staging", "image": f"ghcr.io/acme/api@{DIGEST}"},
     f"image 'ghcr.io/acme/api@{DIGEST}': give a tag, not a digest"),
    ({"environment": "staging", "image": "Ghcr.io/ACME"}, "image 'Ghcr.io/ACME': repository name must be lowercase"),
])
def test_promoted_digest_of_a_tag_questions_are_checked(gate: RunningServer, kit: Kit, params: dict[str, str],
                                                        message: str) -> None:
    reply = gate.get("/api/v1/promoted", params=params, headers={"Authorization": f"Bearer {kit.token('reader')}"})
    assert (reply.status_code, reply.json()["error"]) == (400, message)


def test_promoted_digest_of_a_tag_is_answered_per_image(gate: RunningServer, kit: Kit) -> None:
    built = "sha256:" + "7" * 64
    auth = {"Authorization": f"Bearer {kit.token('ci-bot')}"}
    stored = post(gate, signed(kit, digest=built, built_as="v7"), kit.token("ci-bot"))
    assert stored.status_code == 201, stored.text
    reply = gate.get("/api/v1/promoted", params={"environment": "ci", "image": [
        "ghcr.io/acme/payment-api:v7", "ghcr.io/acme/payment-api:v8"]}, headers=auth)
    assert reply.json() == {"environment": "ci", "images": [
        {"image": "ghcr.io/acme/payment-api:v7", "repository": "ghcr.io/acme/payment-api", "tag": "v7",
         "digest": built, "reference": f"ghcr.io/acme/payment-api@{built}", "builtAs": [built]},
        {"image": "ghcr.io/acme/payment-api:v8", "repository": "ghcr.io/acme/payment-api", "tag": "v8",
         "digest": None, "reference": None, "builtAs": []}]}


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_auth_scheme_is_case_insensitive(gate: RunningServer, kit: Kit, scheme: str) -> None:
    reply = gate.get("/api/v1/environments", headers={"Authorization": f"{scheme} {kit.token('reader')}"})
    assert reply.status_code == 200
    assert reply.json() == {"environments": ["ci", "staging", "production"]}


AFTER = "after must be a whole number from 0 to 9223372036854775807"
LIMIT = "limit must be a whole number from 1 to 1000"
TEXT = "must be at most 1024 characters, without control characters"
BAD_PARAMETERS = {
    "after superscript two": ("/api/v1/records", {"after": "²"}, AFTER),
    "after of 5000 digits": ("/api/v1/records", {"after": "9" * 5000}, AFTER),
    "after 2^100": ("/api/v1/records", {"after": str(2**100)}, AFTER),
    "after 2^63": ("/api/v1/records", {"after": str(2**63)}, AFTER),
    "after negative": ("/api/v1/records", {"after": "-1"}, AFTER),
    "after Arabic-Indic digits": ("/api/v1/records", {"after": "١٢"}, AFTER),
    "after empty": ("/api/v1/records", {"after": ""}, AFTER),
    "limit zero": ("/api/v1/records", {"limit": "0"}, LIMIT),
    "limit 1001": ("/api/v1/records", {"limit": "1001"}, LIMIT),
    "limit 2^100": ("/api/v1/records", {"limit": str(2**100)}, LIMIT),
    "limit fraction": ("/api/v1/audit", {"limit": "1.5"}, LIMIT),
    "audit limit of 5000 digits": ("/api/v1/audit", {"limit": "9" * 5000}, LIMIT),
    "allowed neither true nor false": ("/api/v1/audit", {"allowed": "maybe"}, "allowed must be true or false"),
    "namespace with NUL": ("/api/v1/audit", {"namespace": "a\x00b"}, f"namespace {TEXT}"),
    "user with a newline": ("/api/v1/audit", {"user": "a\nb"}, f"user {TEXT}"),
    "environment of 2000 characters": ("/api/v1/records", {"environment": "e" * 2000}, f"environment {TEXT}"),
    "reason with a wildcard": ("/api/v1/audit", {"reason": "%"},
                               "reason must be a reason code such as not-promoted or break-glass"),
    "digest with a trailing newline": ("/api/v1/records", {"digest": "sha256:" + "a" * 64 + "\n"}, f"digest {TEXT}"),
}


@pytest.mark.parametrize(("path", "params", "message"), BAD_PARAMETERS.values(), ids=BAD_PARAMETERS.keys())
def test_every_parameter_is_parsed_strictly(gate: RunningServer, kit: Kit, path: str, params: dict[str, str],
                                            message: str) -> None:
    reply = gate.get(path, params=params, headers={"Authorization": f"Bearer {kit.token('reader')}"})
    assert reply.status_code == 400
    assert reply.json() == {"error": message, "code": 400}


def test_paging_with_after_and_limit(gate: RunningServer, kit: Kit) -> None:
    for digit in "67":
        post(gate, signed(kit, digest="sha256:" + digit * 64), kit.token("ci-bot"))
    auth = {"Authorization": f"Bearer {kit.token('reader')}"}
    everything = gate.get("/api/v1/records", params={"limit": "1000"}, headers=auth).json()["records"]
    assert len(everything) >= 2
    first = gate.get("/api/v1/records", params={"limit": "1"}, headers=auth).json()["records"]
    after = gate.get("/api/v1/records", params={"after": str(first[0]["seq"]), "limit": "1"}, headers=auth).json()
    assert [r["seq"] for r in first + after["records"]] == [r["seq"] for r in everything[:2]]
    assert gate.get("/api/v1/records", params={"after": str(2**63 - 1)}, headers=auth).json() == {"records": []}
