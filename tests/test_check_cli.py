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
    "broken YAML": ("kind: Pod\nspec: [\n", "error: {path}: not valid YAML (line 3): did not find expected node content"),
    "broken JSON": ('{"kind": "Pod",', "error: {path} document 1: not valid JSON: Expecting property name enclosed in double quotes (line 1)"),
    "scalar document": ("just a string\n", "error: {path} document 1: expected a Kubernetes object (a mapping)"),
    "wrong shape": ("kind: Pod\nmetadata: {name: p}\nspec: {containers: oops}\n",
                    "error: {path} document 1: spec.containers must be a list"),
    "binary": (b"\xff\xfe\x00", "error: {path}: not UTF-8 text"),
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
    lines = ["kind: Pod", "metadata: {name: bomb}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
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
