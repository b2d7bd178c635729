"""The `helm test` hook's script, run for real against a real webhook server over TLS."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

from tests.chart.helm import render
from tools.servers import RunningServer
from webhook import certs


def _script() -> str:
    container = render().one("Pod")["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    return str(container["args"][0])


def _run(url: str, ca_pem: bytes) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEBHOOK_URL": url, "CA_BUNDLE": base64.b64encode(ca_pem).decode()}
    return subprocess.run(
        [sys.executable, "-c", _script()], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_hook_gets_a_verdict_from_the_webhook(digest_only_server: RunningServer) -> None:
    result = _run(digest_only_server.url + "/validate", digest_only_server.ca.read_bytes())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("webhook answered: allowed=False [mutable-tag]")


def test_hook_fails_when_the_certificate_is_not_from_the_expected_ca(
    digest_only_server: RunningServer,
) -> None:
    other_ca, _ = certs.new_ca("some other CA")
    result = _run(digest_only_server.url + "/validate", other_ca)
    assert result.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr


def test_hook_fails_when_the_answer_is_not_an_admission_verdict(digest_only_server: RunningServer) -> None:
    # /healthz answers 405 to a POST: anything but a verdict for our uid must fail the test hook.
    result = _run(digest_only_server.url + "/healthz", digest_only_server.ca.read_bytes())
    assert result.returncode != 0
