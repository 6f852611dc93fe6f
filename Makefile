# VoiceFleet: every command a user or CI runs (ARCHITECTURE.md section 6).
# Local platform: see localdev/README.md (paths, logs, disk and time).

PYTHON ?= .venv/bin/python
INFRA := $(PYTHON) -m voicefleet_localdev
PYTEST := $(PYTHON) -m pytest
# The pinned binaries (helm, kubectl, ...) on PATH for the tests, as `eval "$(make -s env)"` does.
WITH_TOOLS = eval "$$($(INFRA) env)" &&
# uv is pinned here and installed by `make setup` when missing; it installs from uv.lock exactly.
UV_VERSION := 0.13.8
UV := python3 -m uv

# ---------------------------------------------------------------- development

.PHONY: setup check lint typecheck unit unit-tools programs test integration e2e e2e-telephony format
# Virtualenv .venv with every extra, exactly as locked in uv.lock.
setup: .venv/.synced
.venv/.synced: pyproject.toml uv.lock
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --all-extras --frozen
	touch $@

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: setup
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

typecheck: setup
	$(PYTHON) -m mypy

# The two upstream programs unit tests run (helm template, promtool): the pinned helm and
# Debian's prometheus package, installed like the rest of the pinned components.
unit-tools: setup
	$(INFRA) build helm debian

unit: unit-tools
	$(WITH_TOOLS) $(PYTEST) tests/unit

# Every program the local platform runs is installed by `make infra` (fails naming the ones
# nothing installs).
programs: setup
	$(PYTHON) -m voicefleet_localdev.programs

# Lint, types, the installed-programs check and unit tests: needs no running infrastructure.
check: lint typecheck programs unit

# Integration tests (real kube-apiserver, real livekit-server) and the full-stack e2e tests; the
# fixtures start what is not running and stop what they started.
integration: setup infra
	$(WITH_TOOLS) $(PYTEST) tests/integration

e2e: setup infra
	$(WITH_TOOLS) $(PYTEST) tests/e2e

# Only the phone-call e2e (sipp through livekit-sip to the worker pods); part of `make test`.
e2e-telephony: setup infra
	$(WITH_TOOLS) $(PYTEST) tests/e2e/test_telephony.py

# Everything CI runs (README's test command): checks, then every integration and e2e test in one
# pytest session so the cluster and LiveKit stack are started once.
test: check infra
	$(WITH_TOOLS) $(PYTEST) --durations=25 -rs tests/integration tests/e2e

# Mutation testing (not in CI; tens of minutes): mutmut over the pure modules listed in
# mutation.toml, run in .mutation/ (symlinks import the packages under their own names, which
# mutmut needs), then the score per module; survivors in .mutation/survivors.txt.
.PHONY: mutation
MUTATION_CHILDREN ?= 2
mutation: unit-tools
	rm -rf .mutation && mkdir .mutation && cp mutation.toml .mutation/pyproject.toml
	ln -s ../operator/voicefleet_operator ../runtime/voicefleet_runtime ../tests ../examples ../operator \
		../charts ../crds .mutation/
	$(WITH_TOOLS) cd .mutation && ../$(PYTHON) -m mutmut run --max-children $(MUTATION_CHILDREN)
	$(PYTHON) -m voicefleet_localdev.mutation .mutation

# ---------------------------------------------------------------- code generation

.PHONY: generate
# From the API models (operator/voicefleet_operator/api.py): the CRD in crds/ and its copy in
# the chart, and the field reference operator/API.md. A unit test fails when they are stale.
generate: setup
	$(PYTHON) -m voicefleet_operator.crd

# ---------------------------------------------------------------- local infrastructure

.PHONY: infra cluster-up cluster-up-control-plane cluster-down cluster-status images env

# Build/install the pinned upstream components (localdev/versions.toml) into ~/.cache/voicefleet.
infra: setup
	$(INFRA) build

# Cluster (provider auto: kind where Docker can pull, else local); kubeconfig at
# ~/.local/state/voicefleet/kubeconfig. PROVIDER=local|kind to choose.
PROVIDER ?= auto
cluster-up: infra
	$(INFRA) cluster up --provider $(PROVIDER)

cluster-up-control-plane: infra
	$(INFRA) cluster up --control-plane-only --provider $(PROVIDER)

cluster-down: setup
	$(INFRA) cluster down

cluster-status: setup
	$(INFRA) cluster status

# Images with podman (base image built from Debian packages when it cannot be pulled),
# imported into the running node.
images: infra
	$(INFRA) images

# Redis, livekit-server (ws://127.0.0.1:7880, dev keys), livekit-sip (SIP 5060) and Prometheus
# (http://127.0.0.1:9090) as host processes; see localdev/voicefleet_localdev/livekit.py for ports and keys.
.PHONY: livekit-up livekit-down
livekit-up: infra
	$(INFRA) livekit up

livekit-down: setup
	$(INFRA) livekit down

# eval "$(make -s env)": KUBECONFIG, and kubectl/helm/kind/... on PATH.
env: setup
	@$(INFRA) env

# ---------------------------------------------------------------- demo and benchmarks

.PHONY: demo demo-down bench
# The main job: local cluster + LiveKit stack + images + chart + examples/voiceagent.yaml (pointed
# at the local provider server), then a test call (and a sipp phone call) that must be answered.
demo: setup
	$(PYTHON) -m voicefleet_localdev.demo up

# Stop the demo's provider server, the LiveKit stack and the cluster. FORCE=1 even while test
# sessions use the cluster.
demo-down: setup
	$(PYTHON) -m voicefleet_localdev.demo down $(if $(FORCE),--force)

# VoiceFleet against the plain livekit-agents agent a team would write (bench/baseline_agent.py),
# same calls in one run: latency, memory, CPU, calls per core, as p50/p95 and ratios, once per
# provider path; then reconcile time. <state>/logs/bench.json and bench.md (README: Benchmarks).
# ONLY=compare|reconcile|scale runs one mode; scale (100/300/1000 VoiceAgents, SIZES=100,300 to
# choose) runs only when asked.
bench: setup
	$(PYTHON) -m voicefleet_localdev.bench $(if $(ONLY),--only $(ONLY)) $(if $(SIZES),--sizes $(SIZES))

# Turn latency and active calls over the last MINUTES (default 30) from the local Prometheus, as
# a PNG: <state>/logs/voicefleet-calls.png (OUTPUT=path to choose).
.PHONY: plot
plot: setup
	$(PYTHON) -m voicefleet_localdev.plot --minutes $(or $(MINUTES),30) $(if $(OUTPUT),--output $(OUTPUT))
