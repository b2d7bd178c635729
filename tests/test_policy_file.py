"""The policy file: validated once at start-up; a bad key stops the server with a message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.promotion_kit import cli
from tools.servers import REPO
from webhook import policy_file as policy

HEAD = "apiVersion: promotion-gate.io/v1\nkind: Policy\n"

BAD = {
    "unknown top-level key": (HEAD + "defaultMod: enforce\n", "unknown key defaultMod"),
    "unknown nested key": (HEAD + "namespaces:\n  unmaped: deny\n", "unknown key namespaces.unmaped"),
    "bad mode": (HEAD + "defaultMode: enforcing\n", "defaultMode: 'enforcing' is not one of ['enforce', 'warn', 'audit']"),
    "bad environment mode": (HEAD + "environments:\n  - name: ci\n    mode: loud\n",
                             "environments[0].mode: 'loud' is not one of ['enforce', 'warn', 'audit']"),
    "environment name not a DNS label": (HEAD + "environments:\n  - name: Prod\n",
                                         "environments[0].name: 'Prod' is not a DNS label: lowercase letters, digits and '-', at most 63 characters"),
    "environment name with a trailing newline": (HEAD + "environments:\n  - name: \"ci\\n\"\n",
                                                 "environments[0].name: 'ci\\n' is not a DNS label: lowercase letters, digits and '-', at most 63 characters"),
    "duplicate environment": (HEAD + "environments:\n  - name: ci\n  - name: ci\n",
                              "environments[1].name: duplicate environment 'ci'"),
    "unknown trusted key": (HEAD + "environments:\n  - name: ci\n    trustedKeys: [nobody]\n",
                            "environments[0].trustedKeys: no key named 'nobody' under keys"),
    "map to an unknown environment": (HEAD + "namespaces:\n  environments:\n    prod: production\n",
                                      "namespaces.environments.prod: no environment named 'production'"),
    "negative timeout": (HEAD + "store:\n  timeoutSeconds: -1\n", "store.timeoutSeconds: -1 is less than or equal to the minimum of 0"),
    "exempt image with a tag": (HEAD + "exemptImages:\n  - repository: registry.k8s.io/pause:3.9\n",
                                "exemptImages[0].repository: give the repository without tag or digest (put a digest under 'digest')"),
    "exempt image digest malformed": (HEAD + "exemptImages:\n  - repository: a\n    digest: sha256:abc\n",
                                      "exemptImages[0].digest: 'sha256:abc' is not a digest: sha256:<64 lowercase hex> or sha512:<128 lowercase hex>"),
    "token hash with a trailing newline": (HEAD + "api:\n  tokens:\n    - identity: bot\n      sha256: \"" + "a" * 64 + "\\n\"\n",
                                           "api.tokens[0].sha256: '" + "a" * 64 + "\\n' is not the token's SHA-256: 64 lowercase hex characters"),
    "wrong kind": ("apiVersion: promotion-gate.io/v1\nkind: Polcy\n", "kind: 'Policy' was expected"),
    "missing apiVersion": ("kind: Policy\n", "(top level): 'apiVersion' is a required property"),
    "not a mapping": ("- a\n- b\n", "the policy must be a YAML mapping with apiVersion and kind"),
    "not YAML": ("a: [\n", "not valid YAML"),
    "key file missing": (HEAD + "keys:\n  ci: {publicKeyFile: missing.pub}\n", "keys.ci: "),
    "key both file and inline": (HEAD + "keys:\n  ci: {publicKeyFile: a, publicKey: b}\n",
                                 "keys.ci: give exactly one of publicKeyFile or publicKey"),
    "token for an unknown environment": (HEAD + "environments:\n  - name: ci\napi:\n  tokens:\n    - identity: bot\n"
                                         "      sha256: " + "a" * 64 + "\n      environments: [prod]\n",
                                         "api.tokens[0] (bot).environments: no environment named 'prod'"),
    "inline key garbage": (HEAD + "keys:\n  ci: {publicKey: hello}\n", "keys.ci: keys.ci.publicKey: not a PEM public key"),
    "checkpoints never due by time": (HEAD + "audit:\n  checkpointSeconds: 0\n",
                                      "audit.checkpointSeconds: 0 is less than the minimum of 1"),
    "checkpoints too rare": (HEAD + "audit:\n  checkpointSeconds: 86401\n",
                             "audit.checkpointSeconds: 86401 is greater than the maximum of 86400"),
    "unknown checkpoint key": (HEAD + "audit:\n  checkpointKeys: [server]\n",
                               "audit.checkpointKeys: no key named 'server' under keys"),
    "workload kind already built in": (HEAD + "workloadKinds:\n  - {apiGroup: apps, kind: Deployment, resource: deployments, "
                                       "podSpecPath: spec.template.spec}\n",
                                       "workloadKinds[0]: apps/Deployment is a built-in workload kind"),
    "workload kind twice": (HEAD + "workloadKinds:\n" + "  - {apiGroup: argoproj.io, kind: Rollout, resource: rollouts, "
                            "podSpecPath: spec.template.spec}\n" * 2, "workloadKinds[1]: argoproj.io/Rollout is listed twice"),
    "workload kind path with an index": (HEAD + "workloadKinds:\n  - {apiGroup: x.io, kind: Thing, resource: things, "
                                         "podSpecPath: 'spec.templates[0].spec'}\n",
                                         "workloadKinds[0].podSpecPath: 'spec.templates[0].spec' is not a dotted path of "
                                         "field names to the Pod spec, such as spec.template.spec"),
    "workload kind without a resource": (HEAD + "workloadKinds:\n  - {apiGroup: x.io, kind: Thing, podSpecPath: spec}\n",
                                         "workloadKinds[0]: 'resource' is a required property"),
}


@pytest.mark.parametrize(("text", "message"), BAD.values(), ids=BAD.keys())
def test_invalid_policy_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(policy.PolicyError) as error:
        policy.load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_oversized_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(policy.PolicyError, match="file is larger than 1048576 bytes"):
        policy.load(path)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(policy.PolicyError, match="cannot read policy file: No such file or directory"):
        policy.load(tmp_path / "nope.yaml")


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    # The example points at ../var/keys, which `make run` fills: do the same in a scratch copy.
    (tmp_path / "examples").mkdir()
    example = tmp_path / "examples" / "policy.yaml"
    example.write_text((REPO / "examples" / "policy.yaml").read_text())
    subprocess.run([sys.executable, "-m", "tools.dev_setup", str(tmp_path / "var")], cwd=REPO, check=True,
                   capture_output=True)
    loaded = policy.load(example)
    assert loaded.environment_names == ("ci", "staging", "production")
    assert loaded.environment("production").required_signatures == 2  # type: ignore[union-attr]
    assert "promotion-gate" in loaded.exempt_namespaces and "kube-system" in loaded.exempt_namespaces


REFUSED_START = {
    "bad policy": ("defaultMode: enforcing\n",
                   "Error: {path}: defaultMode: 'enforcing' is not one of ['enforce', 'warn', 'audit']"),
    "environments without a store": ("environments:\n  - name: ci\n",
                                     "Error: the policy declares environments, which need a store: pass --store "
                                     "sqlite:///var/promotion-gate.db or a PostgreSQL URL"),
}


@pytest.mark.parametrize(("body", "message"), REFUSED_START.values(), ids=REFUSED_START.keys())
def test_server_refuses_to_start(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + body)
    result = cli("serve", "--policy", str(path), "--cert-dir", str(tmp_path), "--dev-certs", cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip() == message.format(path=path)
