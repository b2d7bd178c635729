# Promotion Gate — every entry point a developer or CI needs.
# `make run` and `make test` work on a fresh clone: they install what they need first.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed-stamp
TOOLCHAIN   := tools/build-toolchain.sh
TOOLBIN     := $(shell echo $${PROMOTION_GATE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/promotion-gate})/bin
PYTEST_ARGS ?=

.PHONY: help venv run test unit lint e2e toolchain system-deps bench manifests e2e-kind clean

help:
	@echo "make run        serve the webhook on https://127.0.0.1:8443 (SQLite store under ./var/)"
	@echo "make test       lint, then the whole suite (unit, PostgreSQL, real kube-apiserver)"
	@echo "make unit       the suite without the control-plane tests"
	@echo "make lint       ruff, mypy and the import layers (import-linter)"
	@echo "make bench      benchmarks, reported as ratios against a baseline (docs/benchmarks.md)"
	@echo "make manifests  re-render manifests/ from the Helm chart"
	@echo "make e2e-kind   the end-to-end suite against a kind cluster (needs Docker)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# PostgreSQL server binaries (Debian's package) for the store tests; installed only when missing.
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing PostgreSQL (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
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
	PATH="$(TOOLBIN):$$PATH" $(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

test: venv system-deps toolchain lint
	PATH="$(TOOLBIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

bench: venv system-deps toolchain
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	$(BIN)/python -m tools.bench

manifests: venv toolchain
	$(BIN)/python -m tools.render_manifests

e2e-kind: venv
	PROMOTION_GATE_CLUSTER=kind $(BIN)/pytest -m e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache build *.egg-info
