"""An audit event has a hard size bound, whatever an AdmissionReview held: pure rules, then a real server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tools.reviews import DIGEST, review, workload
from tools.servers import RunningServer
from webhook.core.audit_limits import MAX_EVENT_BYTES, bound_event, size_of


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": "2026-11-25T23:59:55.977296Z", "uid": "d5ca2bf4-8383-4534-bbef-e3954eca0208", "user": "dev@acme.example",
        "groups": ["system:authenticated"], "namespace": "payments", "kind": "Pod", "name": "api", "operation": "CREATE",
        "subResource": "", "dryRun": False, "environment": None, "mode": "enforce", "allowed": False,
        "reasons": ["mutable-tag"], "findings": ["[mutable-tag] Pod payments/api ..."],
        "images": [{"container": "c0", "field": "spec.containers[0]", "image": "api:1", "repository": "docker.io/library/api",
                    "digest": "", "records": [], "exempt": False}],
        "breakGlass": None, "breakGlassRefused": None, "skipped": "", "policy": "",
    }
    return {**base, **changes}


IMAGE = event()["images"][0]
CASES: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "an ordinary event is left alone": (event(), {}),
    "a name of a megabyte": (event(name="n" * 1_000_000), {"name": 1_000_000}),
    "a uid longer than the store's column": (event(uid="u" * 129), {"uid": 129}),
    "a thousand groups": (event(groups=[f"g{i}" for i in range(1000)]), {"groups": 1000}),
    "ten thousand findings": (event(findings=["[mutable-tag] x"] * 10_000), {"findings": 10_000}),
    "ten thousand images": (event(images=[IMAGE] * 10_000), {"images": 10_000}),
    "an image of 100 kB": (event(images=[{**IMAGE, "image": "i" * 100_000}]), {"images": 1}),
    "a digest too long to be one is dropped": (event(images=[{**IMAGE, "digest": "sha256:" + "a" * 200}]),
                                              {"images": 1}),
    "findings that escape to six bytes a character": (event(findings=["\x01" * 2048] * 100), {"findings": 100}),
}


@pytest.mark.parametrize(("original", "truncated"), CASES.values(), ids=CASES.keys())
def test_every_event_fits_the_bound_and_names_what_was_cut(original: dict[str, Any],
                                                           truncated: dict[str, int]) -> None:
    bounded = bound_event(original)
    assert size_of(bounded) <= MAX_EVENT_BYTES
    assert bounded.get("truncated", {}) == truncated
    if not truncated:
        assert bounded == original


def test_cut_text_ends_with_an_ellipsis_and_lists_keep_their_first_entries() -> None:
    bounded = bound_event(event(name="n" * 300, findings=[f"[mutable-tag] finding {i}" for i in range(500)],
                                images=[{**IMAGE, "digest": "sha256:" + "a" * 200}]))
    assert bounded["name"] == "n" * 252 + "…"
    assert bounded["findings"] == [f"[mutable-tag] finding {i}" for i in range(100)]
    assert bounded["images"][0]["digest"] == ""


def test_every_field_bounded_at_once_still_fits() -> None:
    worst = event(**{k: "\x01" * 100_000 for k in ("uid", "user", "namespace", "kind", "name", "operation",
                                                   "subResource", "environment", "breakGlass", "breakGlassRefused",
                                                   "skipped", "policy")},
                  groups=["\x01" * 100_000] * 1000, findings=["\x01" * 100_000] * 1000,
                  images=[{k: "\x01" * 100_000 for k in ("container", "field", "image", "repository", "digest")}
                          | {"records": ["\x01" * 100] * 1000, "exempt": False}] * 1000)
    assert size_of(bound_event(worst)) <= MAX_EVENT_BYTES


def test_a_6_5_mb_review_makes_an_event_of_at_most_64_kib(digest_only_server: RunningServer) -> None:
    # The red team's body: 6.5 MB of containers with long names and tags (over the API server's limits,
    # but anyone who reaches the port can post it).
    containers = [f"registry.example/{'x' * 200}/app-{i}:{'t' * 100}" for i in range(20_000)]
    body = review(workload("Pod", containers, name="n" * 5000, namespace="hostile"))
    raw = json.dumps(body).encode()
    assert len(raw) > 6_500_000
    reply = digest_only_server.post("/validate", data=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 200
    assert reply.json()["response"]["allowed"] is False
    (logged,) = digest_only_server.decisions(body["request"]["uid"])
    line = json.dumps(logged, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(line) <= MAX_EVENT_BYTES + 100  # the log line adds "msg"
    assert logged["truncated"] == {"name": 5000, "findings": 20_000, "images": 20_000}
    assert len(logged["findings"]) <= 100
    assert logged["findings"][0].startswith('[mutable-tag] Pod hostile/nnnn')


def test_an_ordinary_decision_has_no_truncated_field(digest_only_server: RunningServer) -> None:
    body = review(workload("Pod", [f"api@{DIGEST}"], name="small"))
    digest_only_server.post("/validate", json=body)
    (logged,) = digest_only_server.decisions(body["request"]["uid"])
    assert "truncated" not in logged
