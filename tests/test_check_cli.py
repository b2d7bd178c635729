"""`promotion-gate check`: the admission policy over manifests, before they are applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tools.promotion_kit import IMAGE, cli, make_kit
from tools.reviews import DIGEST, workload

DEPLOY = workload("Deployment", ["ghcr.io/acme/payment-api:1.4"], name="payment-api", namespace="payments")
DEPLOY_LINE = ('[mutable-tag] Deployment payments/payment-api spec.template.spec.containers[0] "c0": image '
               '"ghcr.io/acme/payment-api:1.4" is a mutable tag; deploy by digest: '
               "ghcr.io/acme/payment-api@sha256:<digest>")


def write(tmp: Path, name: str, *docs: object) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_denied_manifest_prints_the_admission_line_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, "app.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}, DEPLOY)
    result = cli("check", str(path))
    assert result.returncode == 1
    assert result.stdout == f"{DEPLOY_LINE}  ({path} document 2)\n"
    assert result.stderr == "1 workload(s) checked, 1 would be denied\n"


def test_clean_manifests_exit_0(tmp_path: Path) -> None:
    path = write(tmp_path, "app.yaml", workload("CronJob", [f"ghcr.io/acme/job@{DIGEST}"]))
    result = cli("check", str(path))
    assert (result.returncode, result.stdout) == (0, "")


def test_directories_lists_stdin_and_json_output(tmp_path: Path) -> None:
    (tmp_path / "dir" / "nested").mkdir(parents=True)
    write(tmp_path / "dir" / "nested", "a.yml", {"apiVersion": "v1", "kind": "List", "items": [DEPLOY, DEPLOY]})
    (tmp_path / "dir" / "b.json").write_text(json.dumps(workload("Pod", ["busybox"])))
    (tmp_path / "dir" / "ignored.txt").write_text("kind: Pod\n")
    result = cli("check", str(tmp_path / "dir"), "-", "--output", "json",
                 stdin=yaml.safe_dump(workload("Job", ["Bad Image"])))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["checked"] == 4 and report["denied"] == 4
    assert [(f["where"], f["reason"]) for f in report["findings"]] == [
        (f"{tmp_path}/dir/b.json document 1", "mutable-tag"),
        (f"{tmp_path}/dir/nested/a.yml document 1 item 0", "mutable-tag"),
        (f"{tmp_path}/dir/nested/a.yml document 1 item 1", "mutable-tag"),
        ("<stdin> document 1", "invalid-reference"),
    ]


UNREADABLE = {
    "missing file": (None, "error: {path}: cannot read: No such file or directory"),
    "broken YAML": ("apiVersion: v1\nkind: Pod\nspec: [\n",
                    "error: {path} document 1: not valid YAML (line 3): expected the node content, but found '<stream end>'"),
    "broken JSON": ('{"kind": "Pod",', "error: {path} document 1: not valid JSON: Expecting property name enclosed in double quotes (line 1)"),
    "wrong shape": ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: oops}\n",
                    "error: {path} document 1: spec.containers must be a list"),
    "binary": (b"\x80\x81\x00", "error: {path}: not UTF-8 text (nor UTF-16 or UTF-32 with a byte-order mark)"),
    "truncated UTF-16": (b"\xff\xfek\x00i\x00n", "error: {path}: not UTF-16-LE text after its byte-order mark"),
    "duplicate key": ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: []\n  containers: []\n",
                      'error: {path} document 1: duplicate key "containers" (line 6); kubectl refuses duplicate fields'),
}


@pytest.mark.parametrize(("content", "message"), UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_input_exits_2_naming_file_and_document(tmp_path: Path, content: str | bytes | None,
                                                           message: str) -> None:
    path = tmp_path / ("in.json" if isinstance(content, str) and content.startswith("{") else "in.yaml")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = cli("check", str(path))
    assert result.returncode == 2
    assert message.format(path=path) in result.stderr


def test_yaml_alias_bomb_is_harmless(tmp_path: Path) -> None:
    lines = ["apiVersion: v1", "kind: Pod", "metadata: {name: bomb}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    lines.append("spec: {containers: [{name: c, image: *a0}]}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = cli("check", str(path))
    assert result.returncode == 2
    assert f"error: {path} document 1: spec.containers[0].image must be a string" in result.stderr


def test_oversized_manifest_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (16 * 1024 * 1024 + 1))
    result = cli("check", str(path))
    assert result.returncode == 2
    assert f"error: {path}: file is larger than 16777216 bytes" in result.stderr


def test_check_with_environment_against_a_local_store(tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "kit")
    store = f"sqlite:///{tmp_path / 's.db'}"
    manifest = write(tmp_path, "pod.yaml", workload("Pod", [IMAGE], name="api", namespace="payments-prod"))
    denied = cli("check", str(manifest), "--policy", str(kit.policy_path), "--environment", "production",
                 "--store", store)
    assert denied.returncode == 1
    assert denied.stdout.startswith(f'[not-promoted] Pod payments-prod/api spec.containers[0] "c0": {IMAGE} has no '
                                    'promotion record for environment "production" (promoted to: none).')
    usage = cli("check", str(manifest), "--environment", "production")
    assert usage.returncode == 2
    assert "--environment needs --server or --store to look up promotion records" in usage.stderr


BAD_INVOCATIONS = {
    "bad policy": (["--policy", "{policy}"], "defaultMode: 'loud' is not one of ['enforce', 'warn', 'audit']"),
    "server and store": (["--environment", "ci", "--policy", "{good}", "--server", "https://127.0.0.1:1",
                          "--store", "sqlite:///x.db"],
                         "give exactly one of --server URL or --store URL"),
    "store without policy": (["--environment", "ci", "--store", "sqlite:///x.db"],
                             "--store needs --policy: the promotion rules come from the policy file"),
    "unsupported store": (["--environment", "ci", "--policy", "{good}", "--store", "mysql://x/y"],
                          "unsupported store 'mysql': use sqlite:///… or postgresql://…"),
    "missing token file": (["--environment", "ci", "--server", "https://127.0.0.1:1", "--token-file", "/nope"],
                           "--token-file /nope: No such file or directory"),
}


@pytest.mark.parametrize(("args", "message"), BAD_INVOCATIONS.values(), ids=BAD_INVOCATIONS.keys())
def test_bad_invocations_exit_2_without_a_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: promotion-gate.io/v1\nkind: Policy\ndefaultMode: loud\n")
    good = make_kit(tmp_path / "kit").policy_path
    manifest = write(tmp_path, "pod.yaml", workload("Pod", [IMAGE]))
    result = cli("check", str(manifest), *[a.format(policy=bad, good=good) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split())


# What kubectl reads, check reads: real-world shapes that a stricter YAML reader refused.
TAGGED_POD = 'apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: [{name: c, image: "api:1"}]}\n'
POD_LINE = ('[mutable-tag] Pod shop/p spec.containers[0] "c": image "api:1" is a mutable tag; deploy by digest: '
            "api@sha256:<digest>")
KUBECTL_READS = {
    "a redefined anchor": ("x-a: &tag a\nx-b: &tag b\n" + TAGGED_POD, "utf-8"),
    "a bare = scalar": ("x-op: =\n" + TAGGED_POD, "utf-8"),
    "a timestamp and an unknown tag": ("x-when: 2026-11-28T10:00:00Z\nx-ref: !Ref thing\n" + TAGGED_POD, "utf-8"),
    "UTF-16 with a byte-order mark": (TAGGED_POD, "utf-16"),
    "UTF-8 with a byte-order mark": (TAGGED_POD, "utf-8-sig"),
    "a document marker with a comment": ("--- # the pod\n" + TAGGED_POD, "utf-8"),
}


@pytest.mark.parametrize(("text", "encoding"), KUBECTL_READS.values(), ids=KUBECTL_READS.keys())
def test_what_kubectl_reads_is_judged(tmp_path: Path, text: str, encoding: str) -> None:
    path = tmp_path / "pod.yaml"
    path.write_bytes(text.encode(encoding))
    result = cli("check", str(path))
    assert (result.returncode, result.stdout) == (1, f"{POD_LINE}  ({path} document 1)\n"), result.stderr


def test_a_json_file_with_several_objects_is_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(workload("Pod", ["a:1"], name="one")) + "\n" + json.dumps(workload("Pod", ["b:1"],
                                                                                                   name="two")))
    report = json.loads(cli("check", str(path), "--output", "json").stdout)
    assert [(f["where"], f["object"]) for f in report["findings"]] == [
        (f"{path} document 1", "Pod team-a/one"), (f"{path} document 2", "Pod team-a/two")]


def test_one_broken_document_does_not_hide_the_next(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(f"{TAGGED_POD}---\napiVersion: v1\nkind: Pod\nspec: [\n---\n{TAGGED_POD}")
    result = cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == f"{POD_LINE}  ({path} document 1)\n{POD_LINE}  ({path} document 3)\n"
    assert result.stderr == (f"error: {path} document 2: not valid YAML (line 8): expected the node content, but "
                             "found '<stream end>'\n")


def test_templates_and_patches_are_named_and_skipped_not_errors(tmp_path: Path) -> None:
    (tmp_path / "chart" / "templates").mkdir(parents=True)
    template = tmp_path / "chart" / "templates" / "deployment.yaml"
    template.write_text("{{- if .Values.enabled }}\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n"
                        "  name: {{ include \"app.fullname\" . }}\n{{- end }}\n")
    quoted = tmp_path / "chart" / "templates" / "pod.yaml"
    quoted.write_text('apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: '
                      '"{{ .Values.image }}"}]}\n')
    patch = tmp_path / "chart" / "patch.json"
    patch.write_text('[{"op": "replace", "path": "/spec/replicas", "value": 3}]')
    argo = tmp_path / "chart" / "workflow.yaml"  # a Go template in a plain string is not Helm's
    argo.write_text(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: w, annotations: {{x: '{{{{inputs.parameters.a}}}}'}}}}\n"
                    f"spec: {{containers: [{{name: c, image: 'api@{DIGEST}'}}]}}\n")
    result = cli("check", str(tmp_path / "chart"))
    assert result.returncode == 0
    assert result.stderr == (
        f"note: {patch} document 1: not a Kubernetes object (a list, such as a JSON patch), skipped\n"
        f"note: {template} document 1: a Helm template, not a manifest: render it first (helm template …), skipped\n"
        f"note: {quoted} document 1: a Helm template, not a manifest: render it first (helm template …), skipped\n"
        "1 workload(s) checked, 0 would be denied\n")


GROUPS = {
    "apps DaemonSet": ("apps/v1", "DaemonSet", 1),
    "OpenKruise DaemonSet": ("apps.kruise.io/v1alpha1", "DaemonSet", 0),
    "a CRD named Deployment": ("example.com/v1", "Deployment", 0),
    "batch CronJob": ("batch/v1", "CronJob", 1),
}


@pytest.mark.parametrize(("api_version", "kind", "judged"), GROUPS.values(), ids=GROUPS.keys())
def test_kinds_are_matched_by_group_and_kind(tmp_path: Path, api_version: str, kind: str, judged: int) -> None:
    document = workload("DaemonSet" if kind == "DaemonSet" else kind if kind == "CronJob" else "Deployment",
                        ["api:1"])
    document["apiVersion"], document["kind"] = api_version, kind
    path = write(tmp_path, "x.yaml", document)
    report = json.loads(cli("check", str(path), "--output", "json").stdout)
    assert (report["checked"], report["denied"]) == (judged, judged)


def test_the_policy_names_more_workload_kinds(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: promotion-gate.io/v1\nkind: Policy\nworkloadKinds:\n"
                      "  - {apiGroup: argoproj.io, kind: Rollout, resource: rollouts, podSpecPath: spec.template.spec}\n"
                      "  - {apiGroup: apps.openshift.io, kind: DeploymentConfig, resource: deploymentconfigs,\n"
                      "     podSpecPath: spec.template.spec}\n")
    rollout = workload("Deployment", ["ghcr.io/acme/api:1.4"], name="api", namespace="shop")
    rollout["apiVersion"], rollout["kind"] = "argoproj.io/v1alpha1", "Rollout"
    path = write(tmp_path, "rollout.yaml", rollout)
    result = cli("check", str(path), "--policy", str(policy))
    assert result.returncode == 1
    assert result.stdout == (f'[mutable-tag] Rollout shop/api spec.template.spec.containers[0] "c0": image '
                             f'"ghcr.io/acme/api:1.4" is a mutable tag; deploy by digest: ghcr.io/acme/api@sha256:<digest>'
                             f"  ({path} document 1)\n")
    assert cli("check", str(path)).returncode == 0  # without the policy, a Rollout carries no known Pod spec
