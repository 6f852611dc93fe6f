# VoiceFleet: every command a user or CI runs (ARCHITECTURE.md section 6).
# Local infrastructure: see e2e/README.md (paths, logs, disk and time).

PYTHON ?= .venv/bin/python
INFRA := $(PYTHON) -m e2e.infra

# ---------------------------------------------------------------- code generation

.PHONY: generate
# From the API models (operator/voicefleet_operator/api.py): the CRD in crds/ and its copy in
# the chart, and the field reference operator/API.md. A unit test fails when they are stale.
generate:
	PYTHONPATH=operator:runtime $(PYTHON) -m voicefleet_operator.crd

# ---------------------------------------------------------------- local infrastructure

.PHONY: infra cluster-up cluster-up-control-plane cluster-down cluster-status images env

# Build/install the pinned upstream components (e2e/versions.toml) into ~/.cache/voicefleet.
infra:
	$(INFRA) build

# Cluster (provider auto: kind where Docker can pull, else local); kubeconfig at
# ~/.local/state/voicefleet/kubeconfig. PROVIDER=local|kind to choose.
PROVIDER ?= auto
cluster-up: infra
	$(INFRA) cluster up --provider $(PROVIDER)

cluster-up-control-plane: infra
	$(INFRA) cluster up --control-plane-only --provider $(PROVIDER)

cluster-down:
	$(INFRA) cluster down

cluster-status:
	$(INFRA) cluster status

# Images with podman (base image built from Debian packages when it cannot be pulled),
# imported into the running node.
images: infra
	$(INFRA) images

# Redis, livekit-server (ws://127.0.0.1:7880, dev keys), livekit-sip (SIP 5060) and Prometheus
# (http://127.0.0.1:9090) as host processes; see e2e/infra/livekit.py for ports and keys.
.PHONY: livekit-up livekit-down
livekit-up: infra
	$(INFRA) livekit up

livekit-down:
	$(INFRA) livekit down

# eval "$(make -s env)": KUBECONFIG, and kubectl/helm/kind/... on PATH.
env:
	@$(INFRA) env
