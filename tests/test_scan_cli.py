"""``promotion-gate scan``: what it says before it asks the cluster anything (usage, policy, kubeconfig)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.promotion_kit import cli, make_kit

USAGE = "Usage: promotion-gate scan [OPTIONS]\nTry 'promotion-gate scan --help' for help.\n\n"
DIGEST_ONLY = "apiVersion: promotion-gate.io/v1\nkind: Policy\nnamespaces:\n  unmapped: digest-only\n"


@pytest.fixture
def policies(tmp_path: Path) -> dict[str, str]:
    digest_only = tmp_path / "digest-only.yaml"
    digest_only.write_text(DIGEST_ONLY)
    return {"digest-only": str(digest_only), "kit": str(make_kit(tmp_path / "kit").policy_path),
            "store": f"sqlite:///{tmp_path / 'store.db'}"}


@pytest.mark.parametrize(("args", "code", "stderr"), [
    ([], 2, USAGE + "Error: scan needs --policy: environments, exemptions and the namespace map come from the policy "
                    "file\n"),
    (["--policy", "{digest-only}", "-n", "Bad_Name"], 2,
     USAGE + 'Error: Invalid value for --namespace: "Bad_Name" is not a namespace name\n'),
    (["--policy", "{kit}"], 2, USAGE + "Error: the policy declares environments, so the scan needs their records: give "
                                       "--server URL or --store URL\n"),
    (["--policy", "{digest-only}", "--kubeconfig", "/nonexistent/kubeconfig"], 2,
     "error: cannot configure the Kubernetes client from kubeconfig /nonexistent/kubeconfig: Invalid kube-config "
     "file. No configuration found.\n"),
    (["--policy", "{kit}", "--store", "{store}", "--server", "https://127.0.0.1:1"], 3,
     "error: give exactly one of --server URL or --store URL\n"),
    (["--policy", "{digest-only}", "--page-size", "100000"], 2,
     USAGE + "Error: Invalid value for '--page-size': 100000 is not in the range 10<=x<=5000.\n"),
])
def test_unusable_input_is_refused_before_the_cluster_is_asked(policies: dict[str, str], args: list[str], code: int,
                                                               stderr: str) -> None:
    result = cli("scan", *(a.format(**policies) for a in args))
    assert (result.returncode, result.stdout, result.stderr) == (code, "", stderr)
