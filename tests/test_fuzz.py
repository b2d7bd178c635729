"""Property-based fuzzing of /validate and the record API against a real server process (hypothesis).

Whatever arrives — raw bytes, any JSON, AdmissionReviews with any field replaced by anything, any
query string, any envelope — the answer is a verdict or a 4xx JSON error: never a 5xx, never a hang
(every request has a client timeout), and the server's memory stays bounded.

``make test`` runs a short pass (``FUZZ_BODIES``, default 1,500 in all); ``make fuzz`` runs the full one
(``FUZZ_BODIES=100000``) and prints the count of bodies sent and of answers by status.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.promotion_kit import DIGEST, Kit, ci_record, envelope, make_kit
from tools.reviews import review, workload
from tools.servers import RunningServer, start_server
from tools.slow_clients import rss_bytes

TOTAL = int(os.environ.get("FUZZ_BODIES", "1500"))
SHARE = {"raw": 0.15, "json": 0.15, "review": 0.35, "api_get": 0.2, "api_post": 0.15}
MEMORY_BOUND = 400 * 2**20  # RSS of the server after the run: far below the chart's 512 MiB limit
TALLY: Counter[str] = Counter()


def examples(kind: str) -> int:
    return max(10, int(TOTAL * SHARE[kind]))


def fuzz_settings(kind: str) -> settings:
    return settings(max_examples=examples(kind), deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("fuzz-kit"))


@pytest.fixture(scope="module")
def target(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, requests.Session]]:
    root = tmp_path_factory.mktemp("fuzz")
    server = start_server(root, policy=kit.policy_path.read_text(), store=f"sqlite:///{root / 'store.db'}")
    session = server.session()
    yield server, session
    rss = rss_bytes(server.process.pid)
    server.stop()
    report = ", ".join(f"{status}: {n}" for status, n in sorted(TALLY.items()))
    print(f"\n[fuzz] {sum(TALLY.values())} bodies sent; answers by status: {report}; "
          f"server memory at the end {rss / 2**20:.0f} MiB")
    out = os.environ.get("FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps({"bodies": sum(TALLY.values()), "by_status": dict(TALLY),
                                         "rss_bytes": rss}) + "\n")
    assert rss < MEMORY_BOUND, f"server memory {rss / 2**20:.0f} MiB after fuzzing"


def check(reply: requests.Response, *, review_uid: Any = None) -> None:
    TALLY[str(reply.status_code)] += 1
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:500]}"
    body = reply.json()  # every answer is JSON
    if reply.status_code >= 400:
        assert set(body) >= {"error", "code"} and body["code"] == reply.status_code, body
        assert isinstance(body["error"], str) and body["error"]
    elif review_uid is not None:
        assert body["kind"] == "AdmissionReview" and body["response"]["uid"] == review_uid


# --- values -------------------------------------------------------------------------------------------

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "²", "١٢", "9" * 5000, str(2**100), "-1", "%", "_", "..", "\ud7ff", "\u202e",
                     "a" * 70_000, "busybox", "Api:1", "ghcr.io/acme/api:1.4", f"ghcr.io/acme/api@{DIGEST}",
                     f"api:1@{DIGEST}", "sha256:" + "a" * 64 + "\n", "promotion-gate.io/break-glass", "kube-system",
                     "CREATE", "UPDATE", "DELETE", "CONNECT", "Pod", "Deployment", "null", "{}", "[]"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | HOSTILE_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(HOSTILE_TEXT, children, max_size=4),
    max_leaves=12,
)
KINDS = ["Pod", "Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicationController",
         "PodTemplate"]


@st.composite
def reviews(draw: st.DrawFn) -> dict[str, Any]:
    """A valid AdmissionReview of some workload, then some of its fields replaced by anything at all."""
    kind = draw(st.sampled_from(KINDS))
    images = draw(st.lists(HOSTILE_TEXT, min_size=0, max_size=4))
    annotations = draw(st.none() | st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=2))
    obj = workload(kind, images, name=draw(HOSTILE_TEXT), namespace=draw(HOSTILE_TEXT), annotations=annotations)
    operation = draw(st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]))
    old = workload(kind, draw(st.lists(HOSTILE_TEXT, max_size=2))) if operation == "UPDATE" else None
    body = review(obj if operation != "DELETE" else None, old=old if operation != "DELETE" else obj,
                  operation=operation, user=draw(HOSTILE_TEXT), groups=draw(st.lists(HOSTILE_TEXT, max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        node: Any = body
        path = draw(st.lists(st.sampled_from(["request", "object", "oldObject", "spec", "template", "metadata",
                                              "containers", "initContainers", "ephemeralContainers", "jobTemplate",
                                              "userInfo", "kind", "name", "namespace", "uid", "image", "annotations",
                                              "options", "dryRun", "subResource", 0, 1]), min_size=1, max_size=6))
        for step in path[:-1]:
            child = node[step] if isinstance(node, dict) and step in node else \
                node[step] if isinstance(node, list) and isinstance(step, int) and step < len(node) else None
            if child is None:
                break
            node = child
        last = path[-1]
        value = draw(JSON)
        settable = (isinstance(node, dict) and isinstance(last, str)) or \
            (isinstance(node, list) and isinstance(last, int) and last < len(node))
        if settable:
            node[last] = value
    return body


# --- /validate ------------------------------------------------------------------------------------------


@fuzz_settings("raw")
@given(body=st.binary(max_size=2048) | st.sampled_from([b'"\\ud800"', b'{"a": "\\udc00"}', b"[" * 5000,
                                                        b'{"apiVersion": 1e999999}', b"\xef\xbb\xbf{}"]))
def test_raw_bytes_to_validate(target: tuple[RunningServer, requests.Session], body: bytes) -> None:
    server, session = target
    check(session.post(server.url + "/validate", data=body, timeout=10, headers={"Content-Type": "application/json"}))


@fuzz_settings("json")
@given(body=JSON)
def test_any_json_to_validate(target: tuple[RunningServer, requests.Session], body: Any) -> None:
    server, session = target
    check(session.post(server.url + "/validate", data=json.dumps(body), timeout=10,
                       headers={"Content-Type": "application/json"}))


@fuzz_settings("review")
@given(body=reviews())
def test_mutated_reviews_to_validate(target: tuple[RunningServer, requests.Session], body: dict[str, Any]) -> None:
    server, session = target
    request = body.get("request")
    uid = request.get("uid") if isinstance(request, dict) else None
    check(session.post(server.url + "/validate", data=json.dumps(body), timeout=10,
                       headers={"Content-Type": "application/json"}), review_uid=uid)


# --- the record API -------------------------------------------------------------------------------------

API_PATHS = st.sampled_from(["/api/v1/records", "/api/v1/audit", "/api/v1/status", "/api/v1/environments",
                             f"/api/v1/trace/{DIGEST}", "/api/v1/trace/sha256:abc", "/api/v1/trace/%00",
                             "/api/v1/nothing-here"])
PARAMETERS = st.dictionaries(st.sampled_from(["after", "limit", "digest", "repository", "environment", "image",
                                              "since", "until", "namespace", "user", "reason", "allowed", "x"]),
                             HOSTILE_TEXT, max_size=4)
AUTH = st.sampled_from(["reader", "ci-bot", "none", "garbage", "lower"])


def headers_for(kit: Kit, auth: str) -> dict[str, str]:
    return {"reader": {"Authorization": f"Bearer {kit.token('reader')}"},
            "ci-bot": {"Authorization": f"Bearer {kit.token('ci-bot')}"},
            "lower": {"Authorization": f"bearer {kit.token('reader')}"},
            "garbage": {"Authorization": "Bearer \x7f\x01 nope"},
            "none": {}}[auth]


@fuzz_settings("api_get")
@given(path=API_PATHS, params=PARAMETERS, auth=AUTH)
def test_record_api_queries(target: tuple[RunningServer, requests.Session], kit: Kit, path: str,
                            params: dict[str, str], auth: str) -> None:
    server, session = target
    check(session.get(server.url + path, params=params, headers=headers_for(kit, auth), timeout=10))


@st.composite
def envelopes(draw: st.DrawFn, kit: Kit) -> Any:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(JSON)
    signed = envelope(kit, ci_record(digest="sha256:" + draw(st.sampled_from("0123456789abcdef")) * 64), "ci").to_json()
    if choice == 1:
        return signed
    if choice == 2:  # a payload that decodes to anything
        signed["payload"] = base64.b64encode(json.dumps(draw(JSON)).encode()).decode()
        return signed
    return {"envelope": signed, "expect": draw(JSON)}


@fuzz_settings("api_post")
@given(data=st.data(), auth=AUTH)
def test_record_api_submissions(target: tuple[RunningServer, requests.Session], kit: Kit, data: st.DataObject,
                                auth: str) -> None:
    server, session = target
    body = data.draw(envelopes(kit))
    check(session.post(server.url + "/api/v1/records", data=json.dumps(body), timeout=10,
                       headers={"Content-Type": "application/json", **headers_for(kit, auth)}))
