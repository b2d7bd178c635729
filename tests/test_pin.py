"""``promotion-gate pin``: real-world manifests and values files, rewritten byte for byte but the images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tools.promotion_kit import Kit, ci_record, cli, envelope, make_kit
from webhook import ledger, policy_file
from webhook.store import open_store

API = "ghcr.io/acme/payment-api"
MIGRATE = "ghcr.io/acme/payment-api-migrate"
D1 = "sha256:" + "1a" * 32  # API built as :abc123, promoted to staging
D2 = "sha256:" + "2b" * 32  # API built as :1.5, only in ci
D3 = "sha256:" + "3c" * 32  # MIGRATE built as :abc123, promoted to staging

DEPLOYMENT = """\
# payment-api — owned by team payments (#payments-oncall)
# Rendered by hand; CI bumps the tags.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payment-api
  namespace: payments-staging
  labels: {app: payment-api, tier: backend}
spec:
  replicas: 3   # HPA overrides this
  selector:
    matchLabels:
      app: payment-api
  template:
    metadata:
      labels:
        app: payment-api
    spec:
      initContainers:
      - name: migrate
        image: "ghcr.io/acme/payment-api-migrate:abc123"   # must match the app version
        args: ["--to", "latest"]
      containers:
        - name: api
          image: ghcr.io/acme/payment-api:abc123
          ports:
            - containerPort: 8080  # http
          env:
            - {name: LOG_LEVEL, value: info}
        - name: proxy
          image: 'docker.io/envoyproxy/envoy:v1.30.1'
        - name: cache
          image: ghcr.io/acme/payment-api:1.5
---
# the Service needs no image
apiVersion: v1
kind: Service
metadata:
  name: payment-api
spec:
  ports: [{port: 80, targetPort: 8080}]
---   # nightly report
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: report
            image: ghcr.io/acme/payment-api@sha256:%s
""" % ("9" * 64)

VALUES = """\
# Default values for payment-api.
replicaCount: 2

image:
  repository: ghcr.io/acme/payment-api   # where CI pushes
  # Overrides the image tag whose default is the chart appVersion.
  tag: "abc123"
  pullPolicy: IfNotPresent

migrations:
  image:
    registry: ghcr.io
    repository: acme/payment-api-migrate
    tag: abc123
worker:
  image:
    repository: ghcr.io/acme/payment-api
    tag: 1.5
pinnedAlready:
  image:
    repository: ghcr.io/acme/payment-api
    tag: abc123
    digest: sha256:%s
sidecars:
  - name: proxy
    image: envoyproxy/envoy:v1.30.1
  - name: api-shadow
    image: ghcr.io/acme/payment-api:abc123  # shadow traffic
defaultTag:
  image:
    repository: ghcr.io/acme/payment-api
    tag: ""
""" % ("9" * 64)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    kit = make_kit(tmp_path / "kit")
    records = ledger.Ledger(open_store(f"sqlite:///{tmp_path / 'store.db'}", migrate=True),
                            policy_file.load(kit.policy_path))
    for repository, digest, tag, environments in ((API, D1, "abc123", ("ci", "staging")), (API, D2, "1.5", ("ci",)),
                                                  (MIGRATE, D3, "abc123", ("ci", "staging"))):
        built = ci_record(repository=repository, digest=digest, built_as=tag)
        for environment in environments:
            record = built if environment == "ci" else dataclasses.replace(
                built, environment=environment, promoted_from="ci", built_as="")
            outcome = records.submit(envelope(kit, record, "ci").to_json(), "ci-bot", lambda _: True)
            assert isinstance(outcome, ledger.Stored), outcome
    return kit


def pin(kit: Kit, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = cli("pin", *args, "--env", "staging", "--store", f"sqlite:///{tmp_path / 'store.db'}", "--policy",
                 str(kit.policy_path))
    return result.returncode, result.stdout, result.stderr


def test_a_deployment_file_keeps_every_byte_but_the_pinned_images(kit: Kit, tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(DEPLOYMENT)
    status, out, err = pin(kit, tmp_path, str(path))
    assert path.read_text() == DEPLOYMENT.replace(
        '"ghcr.io/acme/payment-api-migrate:abc123"', f'"{MIGRATE}@{D3}"').replace(
        "image: ghcr.io/acme/payment-api:abc123", f"image: {API}@{D1}")
    assert status == 1  # two images could not be pinned, and say why
    doc = f"{path} document 1 spec.template.spec"
    assert out.splitlines() == [
        f'pinned {doc}.initContainers[0] "migrate": {MIGRATE}:abc123 -> {MIGRATE}@{D3}',
        f'pinned {doc}.containers[0] "api": {API}:abc123 -> {API}@{D1}',
        f'not pinned {doc}.containers[1] "proxy": docker.io/envoyproxy/envoy:v1.30.1: no valid record says a digest of '
        "docker.io/envoyproxy/envoy was built as :v1.30.1",
        f'not pinned {doc}.containers[2] "cache": {API}:1.5: built as :1.5: {D2[:19]}…; none of them is promoted to '
        "staging"]
    assert err == "2 image(s) pinned in 1 file(s), 2 not pinned, 1 already pinned by digest\n"


def test_a_values_file_pins_tags_by_the_helm_create_convention(kit: Kit, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(VALUES)
    status, out, _ = pin(kit, tmp_path, "--values", str(path))
    assert path.read_text() == VALUES.replace('tag: "abc123"', f'tag: "abc123@{D1}"').replace(
        "    tag: abc123\nworker", f"    tag: abc123@{D3}\nworker").replace(
        "image: ghcr.io/acme/payment-api:abc123  # shadow", f"image: {API}@{D1}  # shadow")
    assert status == 1
    where = f"{path} document 1"
    assert out.splitlines() == [
        f"pinned {where} image.tag: {API}:abc123 -> abc123@{D1}",
        f"pinned {where} migrations.image.tag: {MIGRATE}:abc123 -> abc123@{D3}",
        f"pinned {where} sidecars[1].image: {API}:abc123 -> {API}@{D1}",
        f"not pinned {where} worker.image.tag: {API}:1.5: the tag is not a string in YAML (1.5); quote it so the chart "
        "renders it as written",
        f"not pinned {where} sidecars[0].image: envoyproxy/envoy:v1.30.1: no valid record says a digest of "
        "docker.io/envoyproxy/envoy was built as :v1.30.1",
        f"not pinned {where} defaultTag.image.tag: {API}: the tag is empty (the chart's default, such as its "
        "appVersion, is used)"]


@pytest.mark.parametrize(("name", "text", "pinned"), [
    ("list.yaml", "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n"
                  "  spec:\n    containers:\n    - {name: api, image: ghcr.io/acme/payment-api:abc123}\n",
     f"    - {{name: api, image: {API}@{D1}}}\n"),
    ("pod.json", '{\n  "apiVersion": "v1",\n  "kind": "Pod",\n  "metadata": {"name": "p"},\n  "spec": {"containers": '
                 '[{"name": "api", "image": "ghcr.io/acme/payment-api:abc123"}]}\n}\n',
     f'[{{"name": "api", "image": "{API}@{D1}"}}]}}\n}}\n'),
    ("crlf.yaml", "apiVersion: v1\r\nkind: Pod\r\nmetadata:\r\n  name: p\r\nspec:\r\n  containers:\r\n"
                  "  - name: api\r\n    image: ghcr.io/acme/payment-api:abc123\r\n",
     f"    image: {API}@{D1}\r\n"),
    ("anchor.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"
                    "  - name: a\n    image: &api ghcr.io/acme/payment-api:abc123\n  - name: b\n    image: *api\n",
     f"    image: &api {API}@{D1}\n  - name: b\n    image: *api\n"),
])
def test_other_shapes_are_pinned_in_place(kit: Kit, tmp_path: Path, name: str, text: str, pinned: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode())
    status, _, err = pin(kit, tmp_path, str(path))
    assert status == 0, err
    assert path.read_bytes().decode().endswith(pinned)
    assert path.read_bytes().decode().replace(f"@{D1}", ":abc123") == text


def test_nothing_is_written_when_a_file_cannot_be_read_whole_or_in_a_dry_run(kit: Kit, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = DEPLOYMENT + "---\nkind: [unclosed\n"
    broken.write_text(text)
    chart = tmp_path / "chart" / "templates"
    chart.mkdir(parents=True)
    (chart / "deployment.yaml").write_text("spec:\n  image: {{ .Values.image.repository }}:{{ .Values.image.tag }}\n")
    status, _, err = pin(kit, tmp_path, str(broken), str(tmp_path / "chart"))
    assert status == 2
    assert broken.read_text() == text
    assert err.splitlines()[:3] == [
        f"note: {chart}/deployment.yaml document 1: a Helm template, not a manifest: pin its values file (--values), "
        "skipped",
        f"error: {broken} document 4: not valid YAML: while parsing a flow sequence",
        f"error: {broken}: not rewritten, because a document of it cannot be read"]
    clean = tmp_path / "clean.yaml"
    clean.write_text(DEPLOYMENT)
    status, out, err = pin(kit, tmp_path, str(clean), "--dry-run", "--output", "json")
    assert clean.read_text() == DEPLOYMENT
    report = json.loads(out)
    assert (status, report["dryRun"], report["files"], len(report["pinned"]), report["alreadyPinned"]) == (
        1, True, [str(clean)], 2, 1)


def test_pin_needs_an_environment_the_policy_defines_and_a_reachable_store(kit: Kit, tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(DEPLOYMENT)
    unknown = cli("pin", str(path), "--env", "qa", "--store", f"sqlite:///{tmp_path / 'store.db'}", "--policy",
                  str(kit.policy_path))
    assert unknown.returncode == 2
    assert 'Invalid value for --env: no environment "qa" (defined: ci, staging, production)' in unknown.stderr
    down = cli("pin", str(path), "--env", "staging", "--server", "https://127.0.0.1:9")
    assert down.returncode == 3
    assert down.stderr.startswith("error: cannot reach https://127.0.0.1:9: ")
    assert path.read_text() == DEPLOYMENT
