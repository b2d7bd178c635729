"""`make bench`: performance of the admission path, always as a ratio against a baseline run side by side.

Each scenario runs the real server process (TLS, keep-alive) and drives it with wrk from a
loopback client. Throughput and latency percentiles are reported next to a baseline measured in the
same run on the same machine: the ``/baseline/allow`` endpoint (same stack, no policy), the same
lookup at a smaller store, or the same path without audit logging. Results go to
``bench-results/latest.json`` and a Markdown table on stdout (copied into docs/benchmarks.md).

Environment: BENCH_SECONDS (default 10) per run, BENCH_ROUNDS (3) alternating runs per side (medians are
reported), BENCH_CONNECTIONS (16), BENCH_RECORDS (1000000), BENCH_WORKERS (1),
BENCH_SKIP (comma-separated scenario names), BENCH_ONLY (run only these scenarios: policy, audit, ingest,
scale, scan), BENCH_SCAN_PODS (10000) and BENCH_SCAN_NAMESPACES (100) for the scan scenario.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.promotion_kit import make_kit, policy_document  # noqa: E402
from tools.reviews import review, workload  # noqa: E402
from tools.servers import PostgresServer, RunningServer, postgres_server, start_server  # noqa: E402
from webhook import policy_file as policy_mod  # noqa: E402
from webhook.core import dsse, promotion_rules, records  # noqa: E402
from webhook.core.records import RecordKind, SignedRecord  # noqa: E402
from webhook.store import open_store  # noqa: E402

NOW = records.timestamp(datetime.now(UTC))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
RECORDS = int(os.environ.get("BENCH_RECORDS", "1000000"))
SKIP = set(filter(None, os.environ.get("BENCH_SKIP", "").split(",")))
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
SCAN_PODS = int(os.environ.get("BENCH_SCAN_PODS", "10000"))
SCAN_NAMESPACES = int(os.environ.get("BENCH_SCAN_NAMESPACES", "100"))
WORKERS = os.environ.get("BENCH_WORKERS", "1")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
RESULTS = REPO / "bench-results"
LUA = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status, summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""
DIGEST_OPTIONAL_POLICY = {"apiVersion": "promotion-gate.io/v1", "kind": "Policy",
                          "namespaces": {"unmapped": "digest-only"}}


def wrk(server: RunningServer, path: str, body: dict[str, Any], tmp: Path, *, seconds: int = SECONDS,
        connections: int = CONNECTIONS) -> dict[str, float]:
    body_file, script = tmp / "body.json", tmp / "post.lua"
    body_file.write_text(json.dumps(body))
    script.write_text(LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                          server.url + path], capture_output=True, text=True, env={**os.environ,
                                                                                   "BENCH_BODY": str(body_file)},
                         check=True).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    assert match, out
    count, duration_us, p50, p99, status_errors, socket_errors = map(int, match.groups())
    return {"rps": count / (duration_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "errors": status_errors + socket_errors, "requests": count}


def paired(baseline: Callable[[], dict[str, float]], measured: Callable[[], dict[str, float]],
           rounds: int = ROUNDS) -> tuple[dict[str, float], dict[str, float]]:
    """Alternate baseline and measured runs and keep the median of each metric: drift on a shared
    machine then affects both sides alike."""
    base_runs, measured_runs = [], []
    for _ in range(rounds):
        base_runs.append(baseline())
        measured_runs.append(measured())

    def median(runs: list[dict[str, float]]) -> dict[str, float]:
        return {key: statistics.median(run[key] for run in runs) for key in runs[0]}

    return median(base_runs), median(measured_runs)


def pod(images: list[str], namespace: str = "bench") -> dict[str, Any]:
    return review(workload("Pod", images, name="bench", namespace=namespace))


def digests(count: int, salt: str = "") -> list[str]:
    return ["sha256:" + hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(count)]


@contextmanager
def server(tmp: Path, **kwargs: Any) -> Iterator[RunningServer]:
    kwargs["extra"] = [*kwargs.get("extra", []), "--workers", WORKERS]
    running = start_server(tmp, **kwargs)
    try:
        yield running
    finally:
        running.stop()


def warm(running: RunningServer, path: str, body: dict[str, Any]) -> None:
    session = running.session()
    for _ in range(50):
        session.post(running.url + path, json=body, timeout=10)


def scenario_policy_cost(tmp: Path) -> list[dict[str, Any]]:
    """Issue: digest-only policy vs baseline, 1 and 10 containers."""
    rows = []
    with server(tmp / "s", policy=yaml.safe_dump(DIGEST_OPTIONAL_POLICY), extra=["--baseline-endpoint"]) as running:
        for containers in (1, 10):
            body = pod([f"ghcr.io/acme/app{i}@" + digests(1, str(i))[0] for i in range(containers)])
            warm(running, "/validate", body)
            base, policy = paired(functools.partial(wrk, running, "/baseline/allow", body, tmp),
                                  functools.partial(wrk, running, "/validate", body, tmp))
            rows.append({"scenario": f"digest policy, {containers} container(s)", "baseline": base,
                         "measured": policy, "throughput_ratio": policy["rps"] / base["rps"]})
    return rows


def seed(store_url: str, kit_root: Path, filler: int) -> tuple[list[str], str]:
    """Promote 10 real digests through ci -> staging, plus `filler` raw rows for index size."""
    kit = make_kit(kit_root)
    policy = policy_mod.load(kit.policy_path)
    store = open_store(store_url)
    store.migrate()
    real = digests(10, "real")
    ci_key, release = kit.signing_key("ci"), kit.signing_key("release")
    for digest in real:
        for env, source, signer in (("ci", None, ci_key), ("staging", "ci", release)):
            record = records.Record(kind=RecordKind.PROMOTION, repository="ghcr.io/acme/app", digest=digest,
                                    environment=env, promoted_from=source, at=NOW, by="bench",
                                    source=records.Source("c0ffee", "github.com/acme/app", "1", ""),
                                    tests=records.Tests(10, 0), scan=records.Scan("trivy", {"critical": 0, "high": 0}))
            envelope = dsse.sign(records.payload(record), [signer])
            store.add_record(SignedRecord(envelope, record), "bench",
                             functools.partial(promotion_rules.check_acceptance, policy, envelope, record))
    batch: list[dict[str, Any]] = []
    filler_envelope = '{"payloadType":"application/vnd.in-toto+json","payload":"","signatures":[]}'
    for index, digest in enumerate(digests(filler, "filler")):
        batch.append({"id": hashlib.sha256(digest.encode()).hexdigest(), "kind": "promotion",
                      "repository": f"ghcr.io/acme/filler{index % 1000}", "digest": digest,
                      "environment": ("ci", "staging", "production")[index % 3], "recorded_at": "2026-01-01T00:00:00Z",
                      "submitted_by": "bench", "envelope": filler_envelope})
        if len(batch) == 20000:
            store.bulk_insert_raw(batch)
            batch = []
    if batch:
        store.bulk_insert_raw(batch)
    store.close()
    return real, kit.policy_path.read_text()


def lookup_cost(store_url: str, policy_text: str, real: list[str], tmp: Path, iterations: int = 2000) -> float:
    path = tmp / "policy.yaml"
    path.write_text(policy_text)
    policy = policy_mod.load(path)
    store = open_store(store_url)
    samples = []
    for i in range(iterations):
        digest = real[i % len(real)]
        started = time.perf_counter()
        promotion_rules.evaluate(policy, store.records_for_digest(digest), "ghcr.io/acme/app", digest)
        samples.append(time.perf_counter() - started)
    store.close()
    return statistics.median(samples) * 1e6


def scenario_store_scale(tmp: Path, postgres: PostgresServer | None) -> list[dict[str, Any]]:
    """Issue: lookup at 10k vs 1M records; admission p99 at 1M records with 10 containers; both backends."""
    rows = []
    backends: list[tuple[str, Callable[[str], str]]] = [("sqlite", lambda name: f"sqlite:///{tmp / name}.db")]
    if postgres is not None:
        backends.append(("postgresql", lambda name: postgres.create_database(name)))
    for backend, make_url in backends:
        small_url, large_url = make_url("small"), make_url("large")
        started = time.perf_counter()
        real_small, policy_text = seed(small_url, tmp / f"kit-{backend}-small", 10_000)
        real_large, _ = seed(large_url, tmp / f"kit-{backend}-small", RECORDS)
        seeded = time.perf_counter() - started
        small = lookup_cost(small_url, policy_text, real_small, tmp)
        large = lookup_cost(large_url, policy_text, real_large, tmp)
        rows.append({"scenario": f"record lookup ({backend}), 10,000 vs {RECORDS:,} records",
                     "baseline": {"median_us": small}, "measured": {"median_us": large},
                     "cost_ratio": large / small, "seed_seconds": seeded})
        document = yaml.safe_load(policy_text)
        document["namespaces"]["environments"]["bench"] = "staging"
        body = pod([f"ghcr.io/acme/app@{d}" for d in real_large])
        with server(tmp / f"srv-{backend}", policy=yaml.safe_dump(document), store=large_url,
                    extra=["--baseline-endpoint"]) as running:
            warm(running, "/validate", body)
            assert running.post("/validate", json=body).json()["response"]["allowed"] is True
            base, measured = paired(functools.partial(wrk, running, "/baseline/allow", body, tmp),
                                    functools.partial(wrk, running, "/validate", body, tmp))
        rows.append({"scenario": f"admission, 10 promoted containers, {RECORDS:,} records ({backend})",
                     "baseline": base, "measured": measured, "throughput_ratio": measured["rps"] / base["rps"]})
    return rows


def scenario_audit_cost(tmp: Path) -> list[dict[str, Any]]:
    """Issue: the decision log in the store on the admission path, with vs without."""
    kit = make_kit(tmp / "kit-audit")
    body = pod(["ghcr.io/acme/app:1.0"], namespace="kube-system")  # exempt: judged, logged, allowed
    servers = {}
    with contextlib.ExitStack() as stack:
        for label, store_audit in (("without", False), ("with", True)):
            document = policy_document(kit.root, extra={"audit": {"store": store_audit, "onWriteFailure": "deny"}})
            servers[label] = stack.enter_context(server(tmp / f"audit-{label}", policy=yaml.safe_dump(document),
                                                        store=f"sqlite:///{tmp / f'audit-{label}.db'}"))
            warm(servers[label], "/validate", body)
        without, with_ = paired(functools.partial(wrk, servers["without"], "/validate", body, tmp),
                                functools.partial(wrk, servers["with"], "/validate", body, tmp))
    results = {"without": without, "with": with_}
    return [{"scenario": "audit event in the store (SQLite, synchronous=FULL)", "baseline": results["without"],
             "measured": results["with"], "throughput_ratio": results["with"]["rps"] / results["without"]["rps"]}]


def scenario_ingest(tmp: Path) -> list[dict[str, Any]]:
    """Issue: record ingest rate with signature verification (API, one keep-alive client)."""
    kit = make_kit(tmp / "kit-ingest")
    rows = []
    with server(tmp / "ingest", policy=kit.policy_path.read_text(),
                store=f"sqlite:///{tmp / 'ingest.db'}") as running:
        session = running.session()
        session.headers["Authorization"] = f"Bearer {kit.token('ci-bot')}"
        key = kit.signing_key("ci")
        bodies = []
        for digest in digests(400, "ingest"):
            record = records.Record(kind=RecordKind.PROMOTION, repository="ghcr.io/acme/app", digest=digest,
                                    environment="ci", at=NOW, by="bench", source=records.Source("c", "r", "1", ""),
                                    tests=records.Tests(1, 0), scan=records.Scan("s", {"critical": 0, "high": 0}))
            bodies.append(dsse.sign(records.payload(record), [key]).to_json())
        started = time.perf_counter()
        for body in bodies:
            response = session.post(running.url + "/api/v1/records", json=body, timeout=10)
            assert response.status_code == 201, response.text
        rate = len(bodies) / (time.perf_counter() - started)
        # Baseline: the same envelopes again, refused as duplicates before verification and insert.
        started = time.perf_counter()
        for body in bodies:
            response = session.post(running.url + "/api/v1/records", json=body, timeout=10)
            assert response.status_code == 409, response.text
        baseline = len(bodies) / (time.perf_counter() - started)
    rows.append({"scenario": "record ingest (verify + rules + durable insert) vs duplicate refusal, 1 client",
                 "baseline": {"rps": baseline},
                 "measured": {"rps": rate}, "throughput_ratio": rate / baseline})
    return rows


def populate(api_client: Any, images: list[str], unpromoted: list[str], *, namespaces: int, pods: int) -> None:
    """What the controllers would have made: per namespace, Deployments that own a ReplicaSet that owns 10 Pods.

    One Deployment in ten runs a digest that was never promoted, so the scan has findings to report.
    """
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client

    core: Any = client.CoreV1Api(api_client)  # given plain dicts, as everywhere in the project
    apps: Any = client.AppsV1Api(api_client)
    per_deployment = 10
    deployments = max(1, pods // (namespaces * per_deployment))

    def containers(image: str) -> list[dict[str, str]]:
        return [{"name": "app", "image": image}]

    def namespace_objects(index: int) -> None:
        name = f"bench-{index:03d}"
        core.create_namespace({"metadata": {"name": name, "labels": {"promotion-gate.io/environment": "staging"}}},
                              _preload_content=False)
        for number in range(deployments):
            app = f"app-{number:02d}"
            image = (unpromoted if number % 10 == 9 else images)[(index + number) % len(images)]
            spec = {"selector": {"matchLabels": {"app": app}},
                    "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": containers(image)}}}
            deployment = json.loads(apps.create_namespaced_deployment(name, {"metadata": {"name": app}, "spec": {
                **spec, "replicas": per_deployment}}, _preload_content=False).data)
            owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": app,
                     "uid": deployment["metadata"]["uid"], "controller": True}
            replica_set = json.loads(apps.create_namespaced_replica_set(name, {
                "metadata": {"name": f"{app}-7d9", "ownerReferences": [owner]},
                "spec": {**spec, "replicas": per_deployment}}, _preload_content=False).data)
            rs_owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-7d9",
                        "uid": replica_set["metadata"]["uid"], "controller": True}
            for replica in range(per_deployment):
                core.create_namespaced_pod(name, {
                    "metadata": {"name": f"{app}-7d9-{replica:02d}", "labels": {"app": app},
                                 "ownerReferences": [rs_owner]},
                    "spec": {"nodeName": f"node-{replica % 5}", "containers": containers(image)}},
                    _preload_content=False)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(namespace_objects, range(namespaces)))


def scenario_scan(tmp: Path) -> list[dict[str, Any]]:
    """Issue 12: one full rescan of 10,000 Pods in 100 namespaces against 1,000,000 records, as a ratio
    against a plain paginated list of the same Pods (time and API requests); and the operator's rescan
    from its list+watch caches, which asks the API server nothing."""
    from tools.control_plane import LocalControlPlane
    from webhook import scan
    from webhook.cluster_access import KubeAccess
    from webhook.cluster_listing import POD, ClusterCache, Lister
    from webhook.scan_records import BatchedRecordView

    store_url = f"sqlite:///{tmp / 'scan.db'}"
    started = time.perf_counter()
    real, policy_text = seed(store_url, tmp / "kit-scan", RECORDS)
    seed_seconds = time.perf_counter() - started
    policy_path = tmp / "scan-policy.yaml"
    policy_path.write_text(policy_text)
    policy = policy_mod.load(policy_path)
    control_plane = LocalControlPlane(tmp / "control-plane")
    cluster = control_plane.start()
    rows: list[dict[str, Any]] = []
    try:
        api = KubeAccess(str(cluster.kubeconfig)).api_client()
        started = time.perf_counter()
        populate(api, [f"ghcr.io/acme/app@{d}" for d in real],
                 [f"ghcr.io/acme/app@{d}" for d in digests(10, "unpromoted")],
                 namespaces=SCAN_NAMESPACES, pods=SCAN_PODS)
        populate_seconds = time.perf_counter() - started

        def plain() -> dict[str, float]:
            lister = Lister(api)
            began = time.perf_counter()
            listed = sum(len(items) for items, _ in lister.pages(POD))
            return {"seconds": time.perf_counter() - began, "requests": lister.requests, "pods": listed}

        def full_scan() -> dict[str, float]:
            store = open_store(store_url)
            view = BatchedRecordView(store, policy)
            lister = Lister(api)
            began = time.perf_counter()
            report = scan.run(lister.inventory(), policy, view, observed_at=records.timestamp(datetime.now(UTC)))
            took = time.perf_counter() - began
            store.close()
            return {"seconds": took, "requests": lister.requests, "pods": report.pods,
                    "findings": len(report.findings), "store_queries": view.queries}

        base, measured = paired(plain, full_scan)
        rows.append({"scenario": f"scan: {int(measured['pods']):,} pods in {SCAN_NAMESPACES} namespaces, "
                                 f"{RECORDS:,} records (CLI, lists every kind) vs a plain paginated pod list",
                     "baseline": base, "measured": measured, "time_ratio": measured["seconds"] / base["seconds"],
                     "request_ratio": measured["requests"] / base["requests"], "seed_seconds": seed_seconds,
                     "populate_seconds": populate_seconds})

        cache = ClusterCache(Lister(api)).start()
        try:
            deadline = time.monotonic() + 300
            while not cache.synced and time.monotonic() < deadline:
                time.sleep(0.1)
            listed_by_cache = cache.requests
            store = open_store(store_url)
            view = BatchedRecordView(store, policy)

            def rescan() -> dict[str, float]:
                view.queries = 0
                began = time.perf_counter()
                report = scan.run(cache.snapshot(), policy, view, observed_at="bench")
                return {"seconds": time.perf_counter() - began, "requests": cache.requests - listed_by_cache,
                        "pods": report.pods, "store_queries": view.queries}

            cold = rescan()  # the records of every digest read once
            warm_runs = [rescan() for _ in range(ROUNDS)]
            warm = {key: statistics.median(run[key] for run in warm_runs) for key in warm_runs[0]}
            store.close()
        finally:
            cache.stop()
        rows.append({"scenario": "operator rescan from its list+watch caches: first (records read) vs next "
                                 "(record set unchanged)", "baseline": cold, "measured": warm,
                     "time_ratio": warm["seconds"] / cold["seconds"], "request_ratio": None,
                     "plain_list_seconds": base["seconds"]})
        api.close()
    finally:
        control_plane.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | baseline | measured | ratio |", "|---|---|---|---|"]
    for row in rows:
        def fmt(m: dict[str, float]) -> str:
            if "seconds" in m:
                queries = f", {m['store_queries']:.0f} store queries" if "store_queries" in m else ""
                return f"{m['seconds'] * 1000:.0f} ms, {m['requests']:.0f} API requests{queries}"
            if "median_us" in m:
                return f"{m['median_us']:.0f} µs median"
            parts = [f"{m['rps']:.0f} req/s"]
            if "p99_ms" in m:
                parts.append(f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms")
            return ", ".join(parts)
        ratio = row.get("throughput_ratio")
        if "time_ratio" in row:
            ratio_text = f"time ×{row['time_ratio']:.2f}"
            if row.get("request_ratio") is not None:
                ratio_text += f", requests ×{row['request_ratio']:.2f}"
        elif ratio is not None:
            ratio_text = f"throughput ×{ratio:.2f}"
        else:
            ratio_text = f"cost ×{row['cost_ratio']:.2f}"
        lines.append(f"| {row['scenario']} | {fmt(row['baseline'])} | {fmt(row['measured'])} | {ratio_text} |")
    return "\n".join(lines)


def selected(name: str) -> bool:
    return name not in SKIP and (not ONLY or name in ONLY)


def main() -> None:
    if any(selected(name) for name in ("policy", "audit", "ingest", "scale")) and shutil.which("wrk") is None:
        sys.exit("wrk not found: run 'make bench' (it installs Debian's wrk)")
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="promotion-gate-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        if selected("policy"):
            rows += scenario_policy_cost(tmp)
        if selected("audit"):
            rows += scenario_audit_cost(tmp)
        if selected("ingest"):
            rows += scenario_ingest(tmp)
        if selected("scale"):
            with postgres_server() as postgres:
                rows += scenario_store_scale(tmp, postgres)
        if selected("scan"):
            rows += scenario_scan(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"seconds": SECONDS, "connections": CONNECTIONS, "records": RECORDS, "workers": WORKERS,
            "scenarios": sorted(ONLY) or "all", "scan_pods": SCAN_PODS, "scan_namespaces": SCAN_NAMESPACES,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print(table(rows))


if __name__ == "__main__":
    requests.packages.urllib3.disable_warnings()  # type: ignore[attr-defined]
    main()
