# mt5-mesh — every task a developer or CI runs. `make run` and `make test` set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install gen proto-deps k8s-sync k8s-render run bench-aggregator bench-indicators bench-inference bench-tracing proving-ground test test-unit test-integration test-e2e lint format migrate bench-ingest clean

$(PY):
	python3 -m venv $(VENV)

# torch first, alone, as the local CPU wheel: with no torch installed, a dependency on it would
# make pip resolve the newest release with gigabytes of CUDA packages.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[indicators,inference,gateway,codegen,dev]"
	touch $(STAMP)

install: $(STAMP)

gen: $(STAMP)
	PYTHON=$(PY) tools/gen.sh
	$(MAKE) k8s-sync

# Refresh the copies k8s/base's gateway ConfigMap is made from (tests fail while they differ).
k8s-sync:
	cp envoy/envoy.yaml k8s/base/gateway/envoy.yaml
	cp gen/mt5mesh.binpb k8s/base/gateway/mt5mesh.binpb

# Render and validate one environment offline: make k8s-render ENV=production (needs its secrets.env).
ENV ?= dev
k8s-render: $(STAMP)
	kubectl kustomize k8s/overlays/$(ENV) | $(VENV)/bin/kubernetes-validate --strict -k 1.32.0 -

# The googleapis protos buf resolves imports from (git-ignored, copied from an installed package).
proto-deps: $(STAMP)
	PYTHON=$(PY) tools/gen.sh --deps-only

migrate: $(STAMP)
	$(VENV)/bin/mt5mesh migrate

run: $(STAMP)
	$(VENV)/bin/mt5mesh up

lint: proto-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services tools tests bench
	$(VENV)/bin/buf lint

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Lint first: ruff, mypy and buf lint are part of the definition of done.
test: lint
	$(VENV)/bin/pytest -q

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

test-integration: $(STAMP)
	$(VENV)/bin/pytest -q tests/integration

test-e2e: $(STAMP)
	$(VENV)/bin/pytest -q tests/e2e

bench-ingest: $(STAMP)
	$(PY) -m bench.ingest_bench

bench-aggregator: $(STAMP)
	$(PY) -m bench.aggregator_bench

bench-indicators: $(STAMP)
	$(PY) -m bench.indicators_bench

bench-inference: $(STAMP)
	$(PY) -m bench.inference_bench

bench-tracing: $(STAMP)
	$(PY) -m bench.tracing_bench

# Every part of the proving ground in turn (crash and resume, ...), full forms; each writes its key
# of bench/results/proving_ground.json. `make proving-ground ARGS=--quick` runs the short forms.
proving-ground: $(STAMP)
	$(PY) -m bench.proving $(ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
