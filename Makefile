# Promotion Gate — every entry point a developer or CI needs.
# `make run` and `make test` work on a fresh clone: they install what they need first.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed-stamp
TOOLCHAIN   := tools/build-toolchain.sh
TOOLBIN     := $(shell echo $${PROMOTION_GATE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/promotion-gate})/bin
PYTEST_ARGS ?=
FUZZ_BODIES ?= 100000

.PHONY: help venv run test unit lint e2e toolchain system-deps bench manifests e2e-kind faults fuzz clean \
        e2e-cluster cluster-deps cluster-toolchain cluster-images cluster-up cluster-down

help:
	@echo "make run        serve the webhook on https://127.0.0.1:8443 (SQLite store under ./var/)"
	@echo "make test       lint, then the whole suite (unit, PostgreSQL, real kube-apiserver)"
	@echo "make unit       the suite without the control-plane tests"
	@echo "make lint       ruff, mypy and the import layers (import-linter)"
	@echo "make bench      benchmarks, reported as ratios against a baseline (docs/benchmarks.md)"
	@echo "make faults     kill -9 under load on both backends, FAULT_CYCLES (50) times each: nothing acknowledged lost"
	@echo "make fuzz       property-based fuzzing of /validate and the record API (FUZZ_BODIES, default 100000)"
	@echo "make manifests  re-render manifests/ from the Helm chart"
	@echo "make e2e-kind   the end-to-end suite against a kind cluster (needs Docker)"
	@echo "make e2e-cluster  the chart, its image and real Pods on a single-node cluster (root, no Docker)"
	@echo "make cluster-up / cluster-down  that cluster, to try Promotion Gate by hand (docs/install.md)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Debian packages the tests run for real, installed only when missing: PostgreSQL's server binaries
# (the store tests), the distribution registry and skopeo (record against a registry; the tests start
# the registry with a configuration of their own, never the package's service or default config).
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing PostgreSQL (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
	@missing=""; \
	command -v docker-registry >/dev/null 2>&1 || missing="$$missing docker-registry"; \
	command -v skopeo >/dev/null 2>&1 || missing="$$missing skopeo"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi

# etcd, kube-apiserver, kubectl and helm built from Go modules into a cache outside the repository.
toolchain:
	@$(TOOLCHAIN) all >/dev/null

run: venv
	$(BIN)/python -m tools.dev_setup var
	$(BIN)/promotion-gate serve --dev-certs --cert-dir var/certs --policy examples/policy.yaml \
	  --store sqlite:///var/promotion-gate.db --server-key var/server-key.pem

lint: venv
	$(BIN)/ruff check webhook tests tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

unit: venv system-deps toolchain
	PATH="$(TOOLBIN):$$PATH" $(BIN)/pytest -m "not e2e and not cluster" $(PYTEST_ARGS)

# The single-node cluster scenarios (tests/cluster) run in `make e2e-cluster`, which .ci/run also runs.
test: venv system-deps toolchain lint
	PATH="$(TOOLBIN):$$PATH" $(BIN)/pytest -m "not cluster" $(PYTEST_ARGS)

# kill -9 during admissions and record submissions, on SQLite and PostgreSQL (make test runs 3 cycles of each).
FAULT_CYCLES ?= 50
faults: venv system-deps
	PROMOTION_GATE_FAULT_CYCLES=$(FAULT_CYCLES) $(BIN)/pytest -s tests/test_faults.py $(PYTEST_ARGS)

bench: venv system-deps toolchain
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	$(BIN)/python -m tools.bench

# The long fuzzing run; make test runs the same tests with a short count (docs/security.md).
fuzz: venv
	FUZZ_BODIES=$(FUZZ_BODIES) FUZZ_REPORT=fuzz-results.json $(BIN)/pytest tests/test_fuzz.py -q -s -p no:cacheprovider --timeout=0 $(PYTEST_ARGS)

manifests: venv toolchain
	$(BIN)/python -m tools.render_manifests

e2e-kind: venv
	PROMOTION_GATE_CLUSTER=kind $(BIN)/pytest -m e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# --- the single-node cluster (tools/cluster): real Pods without Docker ------------------------------
# Debian packages (containerd, runc, CNI plugins, iptables, registry, buildah, skopeo, mmdebstrap, ...),
# installed only when missing.
cluster-deps: venv
	$(BIN)/python -m tools.cluster deps

# kubelet, kube-controller-manager, kube-scheduler, kube-proxy and CoreDNS, next to the e2e toolchain.
cluster-toolchain:
	@$(TOOLCHAIN) cluster >/dev/null

# pause, the Debian base and the project image (buildah, from the Dockerfile), cached by their inputs.
cluster-images: venv cluster-deps
	$(BIN)/python -m tools.cluster images

cluster-up: venv system-deps cluster-deps cluster-toolchain cluster-images
	$(BIN)/python -m tools.cluster up

cluster-down: venv
	$(BIN)/python -m tools.cluster down

e2e-cluster: venv system-deps cluster-deps cluster-toolchain cluster-images
	PATH="$(TOOLBIN):$$PATH" $(BIN)/pytest tests/cluster -m cluster $(PYTEST_ARGS)
