"""The pure policy core, as tables: (request, policy, environment, records) -> verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tools.reviews import DIGEST, review, workload
from webhook import policy_file as policy
from webhook.core import decision
from webhook.core import review as admission
from webhook.core.promotion import Lookup, Promotion, PromotionStatus, Subject, TagPromotion, TagSubject


class Records:
    """The store's answers, fixed per test: the core's input, not a stand-in for the store."""

    def __init__(self, answers: dict[str, PromotionStatus],
                 tags: Mapping[str, Mapping[TagSubject, TagPromotion]] | None = None) -> None:
        self.answers = answers
        self.tags = tags or {}
        self.asked: list[tuple[tuple[Subject, ...], tuple[TagSubject, ...]]] = []

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        self.asked.append((tuple(subjects), tuple(tags)))
        known = self.tags.get(environment, {})
        return Lookup({s: self.answers.get(environment, PromotionStatus(Promotion.NOT_PROMOTED)) for s in subjects},
                      {t: known[t] for t in tags if t in known})


POLICY = policy.parse({
    "apiVersion": "promotion-gate.io/v1", "kind": "Policy",
    "environments": [{"name": "ci"}, {"name": "staging"}, {"name": "production", "mode": "warn"}],
    "namespaces": {"unmapped": "deny"},
    "exemptImages": [{"repository": "ghcr.io/acme/tool", "digest": DIGEST}],
}, base_dir=Path("."))
IMAGE = f"ghcr.io/acme/api@{DIGEST}"


def verdict(image: str, environment: str | None, answers: dict[str, PromotionStatus] | None = None,
            namespace: str = "shop") -> decision.Verdict:
    request = admission.parse_review(review(workload("Pod", [image], name="p", namespace=namespace)))
    return decision.decide(request, POLICY, environment, Records(answers or {}))


CASES = {
    "promoted": (IMAGE, "staging", {"staging": PromotionStatus(Promotion.PROMOTED, ("r1",), ("ci", "staging"))},
                 True, None),
    "not promoted": (IMAGE, "staging", {"staging": PromotionStatus(Promotion.NOT_PROMOTED, promoted_to=("ci",))},
                     False, f'[not-promoted] Pod shop/p spec.containers[0] "c0": {IMAGE} has no promotion record for '
                            f'environment "staging" (promoted to: ci). Promote it: promotion-gate promote {IMAGE} '
                            "--to staging"),
    "untrusted": (IMAGE, "staging", {"staging": PromotionStatus(Promotion.UNTRUSTED, detail="chain broken")}, False,
                  f'[untrusted-record] Pod shop/p spec.containers[0] "c0": {IMAGE} has a promotion record for '
                  'environment "staging" that cannot be trusted: chain broken'),
    "store down": (IMAGE, "ci", {"ci": PromotionStatus(Promotion.UNAVAILABLE, detail="timed out")}, False,
                   f'[store-unavailable] Pod shop/p spec.containers[0] "c0": {IMAGE}: the attestation store did not '
                   "answer (timed out); retry, or ask the cluster operator"),
    "unmapped namespace": (IMAGE, None, {}, False,
                           '[no-environment] Pod shop/p: namespace "shop" has no environment; label it: kubectl label '
                           "namespace shop promotion-gate.io/environment=<ci|staging|production>"),
    "label names an unknown environment": (IMAGE, "qa", {}, False,
                                           '[no-environment] Pod shop/p: namespace "shop" is labelled environment '
                                           '"qa", which the policy does not define (defined: ci, staging, production)'),
    "exempt repository plus digest": (f"ghcr.io/acme/tool@{DIGEST}", "ci", {}, True, None),
    "exempt repository, other digest": ("ghcr.io/acme/tool@sha256:" + "c" * 64, "ci", {}, False,
                                        '[not-promoted] Pod shop/p spec.containers[0] "c0": ghcr.io/acme/tool@sha256:'
                                        + "c" * 64 + ' has no promotion record for environment "ci" (promoted to: '
                                        "none). Promote it: promotion-gate promote ghcr.io/acme/tool@sha256:"
                                        + "c" * 64 + " --to ci"),
}


@pytest.mark.parametrize(("image", "environment", "answers", "allowed", "message"), CASES.values(), ids=CASES.keys())
def test_promotion_gated_admission(image: str, environment: str | None, answers: dict[str, PromotionStatus],
                                   allowed: bool, message: str | None) -> None:
    result = verdict(image, environment, answers)
    assert result.allowed is allowed
    if message is not None:
        assert result.message == message


def test_admitting_record_ids_are_kept_for_the_audit_event() -> None:
    result = verdict(IMAGE, "staging", {"staging": PromotionStatus(Promotion.PROMOTED, ("r1",), ("ci", "staging"))})
    assert [(i.digest, i.record_ids) for i in result.images] == [(DIGEST, ("r1",))]


def test_environment_mode_overrides_the_default() -> None:
    result = verdict(IMAGE, "production", {})
    assert result.allowed is True
    assert result.reasons == ("not-promoted", "warn-only")
    assert result.warnings[0] == ('[not-promoted] "c0": sha256:aaaaaaaaaaaa… not promoted to production; '
                                  "promotion-gate promote … --to production")


def test_labels_mean_nothing_to_a_policy_without_environments() -> None:
    digest_only = policy.parse({"apiVersion": "promotion-gate.io/v1", "kind": "Policy"}, base_dir=Path("."))
    request = admission.parse_review(review(workload("Pod", [IMAGE], name="p", namespace="shop")))
    result = decision.decide(request, digest_only, "production", Records({}))
    assert result.allowed is True


@pytest.mark.parametrize(("revoked_from", "promoted"), [
    ("staging", "ci; revoked from staging"),
    ("ci", "none; revoked from ci"),  # an upstream revocation took this environment's promotion away
])
def test_revocation_is_named_in_the_denial(revoked_from: str, promoted: str) -> None:
    promoted_to = ("ci",) if revoked_from == "staging" else ()
    result = verdict(IMAGE, "staging", {"staging": PromotionStatus(
        Promotion.NOT_PROMOTED, promoted_to=promoted_to, detail="revoked", revoked_from=revoked_from)})
    assert result.message == (f'[not-promoted] Pod shop/p spec.containers[0] "c0": {IMAGE} has no promotion record '
                               f'for environment "staging" (promoted to: {promoted}). Promote it: '
                               f"promotion-gate promote {IMAGE} --to staging")


class _BrokenStream:
    def write(self, _text: str) -> int:
        raise BrokenPipeError("stdout is gone")

    def flush(self) -> None:
        raise BrokenPipeError("stdout is gone")


@pytest.mark.parametrize(("on_failure", "allowed"), [("deny", False), ("allow", True)])
def test_a_decision_log_that_cannot_be_written_never_causes_a_500(on_failure: str, allowed: bool) -> None:
    from webhook.decision_log import StdoutDecisionLog
    from webhook.server import app as server

    strict = policy.parse({"apiVersion": "promotion-gate.io/v1", "kind": "Policy",
                           "audit": {"onWriteFailure": on_failure}}, base_dir=Path("."))
    services = server.default_services(strict)
    services.decision_log = StdoutDecisionLog(_BrokenStream())  # type: ignore[arg-type]
    client = server.create_app(services).test_client()
    reply = client.post("/validate", json=review(workload("Pod", [IMAGE], name="p", namespace="shop")))
    assert reply.status_code == 200
    assert reply.json["response"]["allowed"] is allowed  # type: ignore[index]


KINDS_POLICY = policy.parse({
    "apiVersion": "promotion-gate.io/v1", "kind": "Policy", "namespaces": {"unmapped": "digest-only"},
    "workloadKinds": [{"apiGroup": "argoproj.io", "kind": "Rollout", "resource": "rollouts",
                       "podSpecPath": "spec.template.spec"}],
}, base_dir=Path("."))


@pytest.mark.parametrize(("group", "kind", "message"), [
    ("argoproj.io", "Rollout", '[mutable-tag] Rollout shop/api spec.template.spec.containers[0] "c0": image "api:1" '
                               "is a mutable tag; deploy by digest: api@sha256:<digest>"),
    ("apps", "DaemonSet", '[mutable-tag] DaemonSet shop/api spec.template.spec.containers[0] "c0": image "api:1" '
                          "is a mutable tag; deploy by digest: api@sha256:<digest>"),
    ("apps.kruise.io", "DaemonSet", None),  # same kind name, another group: not a workload of the policy
])
def test_admission_matches_kinds_by_group_and_kind(group: str, kind: str, message: str | None) -> None:
    body = review(workload("DaemonSet", ["api:1"], name="api", namespace="shop"))
    body["request"]["kind"] = {"group": group, "version": "v1", "kind": kind}
    body["request"]["object"]["kind"] = kind
    result = decision.decide(admission.parse_review(body), KINDS_POLICY, None, Records({}))
    if message is None:
        assert (result.allowed, result.skipped) == (True, f"{group}/{kind} is not a workload kind")
    else:
        assert (result.allowed, result.message) == (False, message)


PROMOTED = "sha256:f8a2" + "c0ffee" * 10
TAGS = {"staging": {("ghcr.io/acme/payment-api", "abc123"): TagPromotion(digest=PROMOTED, built=(PROMOTED,)),
                    ("ghcr.io/acme/payment-api", "old"): TagPromotion(built=("sha256:" + "d" * 64,))},
        "production": {("ghcr.io/acme/payment-api", "abc123"): TagPromotion(digest=PROMOTED, built=(PROMOTED,))}}


@pytest.mark.parametrize(("image", "environment", "message"), [
    ("ghcr.io/acme/payment-api:abc123", "staging",
     '[mutable-tag] Pod shop/p spec.containers[0] "c0": image "ghcr.io/acme/payment-api:abc123" is a mutable tag; '
     f"the digest promoted to staging for :abc123 is ghcr.io/acme/payment-api@{PROMOTED}"),
    # built as :old, but not promoted to staging: no fix is offered, only the rule
    ("ghcr.io/acme/payment-api:old", "staging",
     '[mutable-tag] Pod shop/p spec.containers[0] "c0": image "ghcr.io/acme/payment-api:old" is a mutable tag; '
     "deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>"),
    # the records' answer is for another environment: this namespace's environment decides
    ("ghcr.io/acme/payment-api:abc123", "ci",
     '[mutable-tag] Pod shop/p spec.containers[0] "c0": image "ghcr.io/acme/payment-api:abc123" is a mutable tag; '
     "deploy by digest: ghcr.io/acme/payment-api@sha256:<digest>"),
])
def test_a_mutable_tag_denial_names_the_promoted_digest(image: str, environment: str, message: str) -> None:
    request = admission.parse_review(review(workload("Pod", [image], name="p", namespace="shop")))
    result = decision.decide(request, POLICY, environment, Records({}, TAGS))
    assert (result.allowed, result.message) == (False, message)


def test_the_warning_keeps_the_promoted_digest_within_120_characters() -> None:
    request = admission.parse_review(review(workload("Pod", ["ghcr.io/acme/payment-api:abc123"], name="p",
                                                     namespace="shop")))
    result = decision.decide(request, POLICY, "production", Records({}, TAGS))  # production is in warn mode
    assert result.allowed is True
    assert result.warnings == (
        '[mutable-tag] "c0": mutable tag; promoted to production for :abc123: ghcr.io/acme/payment-api@sha256:'
        "f8a2c0ffeec0ffeec0…",)
    assert len(result.warnings[0]) == 120


def test_tags_are_asked_with_the_digests_in_one_lookup_and_only_where_records_count() -> None:
    images = ["ghcr.io/acme/payment-api:abc123", IMAGE, "ghcr.io/acme/tool:1", "busybox"]
    request = admission.parse_review(review(workload("Pod", images, name="p", namespace="shop")))
    records = Records({})
    decision.decide(request, POLICY, "staging", records)
    assert records.asked == [((("ghcr.io/acme/api", DIGEST),),
                              (("ghcr.io/acme/payment-api", "abc123"), ("ghcr.io/acme/tool", "1"),
                               ("docker.io/library/busybox", "latest")))]
    digest_only = Records({})
    decision.decide(request, policy.parse({"apiVersion": "promotion-gate.io/v1", "kind": "Policy"},
                                          base_dir=Path(".")), None, digest_only)
    assert digest_only.asked == []  # no environment, no records: nothing to ask


DEPLOYMENT_CONTROLLER = "system:serviceaccount:kube-system:deployment-controller"


def _replica_set(owned: bool) -> dict:  # type: ignore[type-arg]
    obj = workload("ReplicaSet", [IMAGE], name="api-7d9", namespace="shop")
    if owned:
        obj["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api",
                                               "uid": "u", "controller": True}]
    return obj


@pytest.mark.parametrize(("owned", "user", "judged"), [
    (True, DEPLOYMENT_CONTROLLER, False),  # the Deployment was judged; the Pods will be
    (True, "mallory@example.com", True),  # an ownerReference is anyone's to write
    (False, DEPLOYMENT_CONTROLLER, True),
])
def test_an_object_a_trusted_controller_makes_for_its_owner_is_not_judged_again(owned: bool, user: str,
                                                                                 judged: bool) -> None:
    revoked = {"staging": PromotionStatus(Promotion.NOT_PROMOTED, detail="revoked", revoked_from="staging")}
    request = admission.parse_review(review(_replica_set(owned), user=user))
    result = decision.decide(request, POLICY, "staging", Records(revoked))
    assert result.allowed is not judged
    if not judged:
        assert result.skipped == (f"ReplicaSet created by {DEPLOYMENT_CONTROLLER} for the workload that owns it; "
                                  "its Pods are judged")
    pod = workload("Pod", [IMAGE], name="api-7d9-x", namespace="shop")
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7d9",
                                           "uid": "u", "controller": True}]
    its_pod = decision.decide(admission.parse_review(review(pod, user="system:serviceaccount:kube-system:"
                                                                       "replicaset-controller")),
                              POLICY, "staging", Records(revoked))
    assert its_pod.allowed is False  # the Pods are always judged
