"""Break-glass as a table of pure cases: every place the annotation can live is judged on its own.

The annotation reaches objects admitted later through each template on the way to the Pods: a
Deployment's ``spec.template.metadata`` (its Pods), a CronJob's ``spec.jobTemplate.metadata`` (its
Jobs) and ``spec.jobTemplate.spec.template.metadata`` (their Pods). A value already present in one
place must never mask one added, moved or changed in another by someone not allowed to break glass.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tools.reviews import DIGEST, review, workload
from webhook import policy_file
from webhook.core import decision
from webhook.core import review as admission
from webhook.core.promotion import NoRecords

ANNOTATION = "promotion-gate.io/break-glass"
POLICY = policy_file.parse({
    "apiVersion": "promotion-gate.io/v1", "kind": "Policy", "namespaces": {"unmapped": "digest-only"},
    "breakGlass": {"users": ["oncall@example.com"]},
}, base_dir=Path("."))
PINNED = f"ghcr.io/acme/api@{DIGEST}"
MALLORY, ONCALL = "mallory@example.com", "oncall@example.com"
PLACES = {
    "Deployment": {"object": ("metadata",), "pods": ("spec", "template", "metadata")},
    "CronJob": {"object": ("metadata",), "jobs": ("spec", "jobTemplate", "metadata"),
                "pods": ("spec", "jobTemplate", "spec", "template", "metadata")},
}


def annotated(kind: str, values: dict[str, str]) -> dict[str, Any]:
    """A ``kind`` with one pinned container and the annotation set in the named places."""
    obj = workload(kind, [PINNED], name="api", namespace="shop")
    for place, value in values.items():
        node = obj
        for key in PLACES[kind][place]:
            node = node.setdefault(key, {})
        node.setdefault("annotations", {})[ANNOTATION] = value
    return obj


def judge(kind: str, old: dict[str, str] | None, new: dict[str, str], user: str) -> decision.Verdict:
    before = annotated(kind, old) if old is not None else None
    body = review(annotated(kind, new), operation="UPDATE" if before else "CREATE", old=before, user=user)
    return decision.decide(admission.parse_review(body), POLICY, None, NoRecords())


def refused_line(kind: str) -> str:
    return (f"[break-glass] {kind} shop/api: only people allowed to break glass may set the {ANNOTATION} annotation; "
            f'user "{MALLORY}" is not allowed to break glass')


INC, OTHER = "INC-4711", "INC-9999"
# name: (kind, annotations before (None: CREATE), annotations after, user, allowed)
CASES: dict[str, tuple[str, dict[str, str] | None, dict[str, str], str, bool]] = {
    "adding it to the Pod template while the Deployment has it": (
        "Deployment", {"object": INC}, {"object": INC, "pods": INC}, MALLORY, False),
    "changing the Pod template's value while the Deployment's stays": (
        "Deployment", {"object": INC, "pods": INC}, {"object": INC, "pods": OTHER}, MALLORY, False),
    "moving it from the Deployment to the Pod template": (
        "Deployment", {"object": INC}, {"pods": INC}, MALLORY, False),
    "moving it from the Pod template to the Deployment": (
        "Deployment", {"pods": INC}, {"object": INC}, MALLORY, False),
    "removing it from the Pod template": ("Deployment", {"object": INC, "pods": INC}, {"object": INC}, MALLORY, True),
    "removing it everywhere": ("Deployment", {"object": INC, "pods": INC}, {}, MALLORY, True),
    "leaving every place as it was": ("Deployment", {"object": INC, "pods": INC}, {"object": INC, "pods": INC},
                                      MALLORY, True),
    "a permitted user adding it to the Pod template": ("Deployment", {"object": INC}, {"object": INC, "pods": INC},
                                                       ONCALL, True),
    "adding it to a CronJob's job template while the CronJob has it": (
        "CronJob", {"object": INC}, {"object": INC, "jobs": INC}, MALLORY, False),
    "adding it to a CronJob's Pod template while the job template has it": (
        "CronJob", {"jobs": INC}, {"jobs": INC, "pods": INC}, MALLORY, False),
    "creating a CronJob with it only in the job template": ("CronJob", None, {"jobs": INC}, MALLORY, False),
    "a permitted user creating a CronJob with it in the job template": ("CronJob", None, {"jobs": INC}, ONCALL, True),
    "changing the CronJob's own value while the templates keep theirs": (
        "CronJob", {"object": INC, "jobs": INC, "pods": INC}, {"object": OTHER, "jobs": INC, "pods": INC},
        MALLORY, False),
}


@pytest.mark.parametrize("name", CASES)
def test_break_glass_places(name: str) -> None:
    kind, old, new, user, allowed = CASES[name]
    verdict = judge(kind, old, new, user)
    assert verdict.allowed is allowed
    assert verdict.message == ("" if allowed else refused_line(kind))


def test_the_objects_own_annotation_is_the_reason_it_is_admitted_by() -> None:
    tagged = annotated("Deployment", {"object": "INC-1 on the object", "pods": "INC-2 on the template"})
    tagged["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/acme/api:1.4"
    body = review(tagged, user=ONCALL)
    verdict = decision.decide(admission.parse_review(body), POLICY, None, NoRecords())
    assert verdict.allowed and verdict.break_glass_reason == "INC-1 on the object"


def test_controllers_carry_the_annotation_to_the_pods() -> None:
    job = workload("Job", ["ghcr.io/acme/api:1.4"], name="api-2961", namespace="shop",
                   annotations={ANNOTATION: INC})
    job["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "api",
                                           "uid": "u", "controller": True}]
    cronjob_controller = "system:serviceaccount:kube-system:cronjob-controller"
    made = decision.decide(admission.parse_review(review(copy.deepcopy(job), user=cronjob_controller)), POLICY,
                           None, NoRecords())
    assert made.allowed and made.skipped.startswith("Job created by ")  # its owner was judged; its Pods will be
    pod = workload("Pod", ["ghcr.io/acme/api:1.4"], name="api-2961-x", namespace="shop",
                   annotations={ANNOTATION: INC})
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "api-2961",
                                           "uid": "u", "controller": True}]
    job_controller = "system:serviceaccount:kube-system:job-controller"
    its_pod = decision.decide(admission.parse_review(review(pod, user=job_controller)), POLICY, None, NoRecords())
    assert its_pod.allowed and its_pod.break_glass_reason == INC
    by_hand = decision.decide(admission.parse_review(review(job, user=MALLORY)), POLICY, None, NoRecords())
    assert not by_hand.allowed
