"""Rendering: a VoiceAgent's spec (plus platform settings) -> the child objects, as plain dicts.

Pure functions, no I/O: the reconcile reads what it needs (the platform's LiveKit Secret, the
tenant's Secrets, the current replicas) and passes it in. Golden files pin every child.

Children of VoiceAgent `<name>` in tenant namespace `<ns>` live in the tenant's worker
namespace `vf-<ns>` (worker_namespace.py creates it; the tenant can observe it, not read its
Secrets nor exec into its pods). Owner references cannot cross namespaces: every child carries
the VoiceAgent's namespace, name and uid as labels (child_labels), the operator checks ownership
by the uid label and the VoiceAgent's finalizer deletes them:

    ServiceAccount       <name>           no API token mounted: workers never talk to Kubernetes
    Secret               <name>-livekit   LIVEKIT_API_KEY/SECRET copied from the platform Secret
    Secret               <name>-secrets   copies of the tenant Secrets' values the spec refers to
                                          (secretRefs: every key; header, signing and recording
                                          references: that key, under its env var's name)
    ConfigMap            <name>-config    the runtime config (no secrets: `valueFromEnv` names)
    Service              <name>-metrics   headless, one endpoint per worker for Prometheus
    PodDisruptionBudget  <name>           evictions one worker at a time
    NetworkPolicy        <name>           ingress from the platform and its monitoring only;
                                          egress: DNS, LiveKit, own namespace, declared URLs,
                                          public internet (netpol.py)
    Deployment           <name>           the workers (applied last, once everything it uses exists)
    HorizontalPodAutoscaler <name>        only with scaling.mode hpa (and no pin): scales the
                                          Deployment on the workers' load metric

Why copy the LiveKit credentials into each worker namespace: the workers need them to register
with LiveKit, and a pod can only read Secrets of its own namespace. The worker namespace is the
platform's, not the tenant's: tenants never hold the key (operator/README.md, "Tenant
isolation"). The copy follows the platform Secret on every reconcile; the workers need no RBAC.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from voicefleet_runtime.admission import OverflowReason, worker_capacity
from voicefleet_runtime.config import CONFIG_PATH_ENV, RuntimeConfig, parse_config

from voicefleet_operator import netpol
from voicefleet_operator.api import (
    RECORDING_ACCESS_KEY_ID,
    RECORDING_SECRET_ACCESS_KEY,
    CallRecordWebhookSpec,
    HttpHeaderSpec,
    VoiceAgentSpec,
    WorkerSpec,
)
from voicefleet_operator.scaling import ScalingPolicy, render_hpa
from voicefleet_operator.settings import LIVEKIT_SECRET_KEYS, PlatformSettings

# --- names, labels, annotations -----------------------------------------------------------

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VOICE_AGENT = "voicefleet.dev/voiceagent"
"""On every child: the owning VoiceAgent's name (the Deployment watcher finds its owner by it)."""
LABEL_VOICE_AGENT_NAMESPACE = "voicefleet.dev/voiceagent-namespace"
"""On every child: the owning VoiceAgent's (tenant) namespace."""
LABEL_VOICE_AGENT_UID = "voicefleet.dev/voiceagent-uid"
"""On every child: the owning VoiceAgent's uid (ownership: owner references cannot cross
namespaces)."""
LABEL_TENANT = "voicefleet.dev/tenant"
"""On a worker namespace: the tenant namespace it serves."""

WORKER_NAMESPACE_PREFIX = "vf-"
TENANT_NAMESPACE_MAX_LENGTH = 63 - len(WORKER_NAMESPACE_PREFIX)
"""A worker namespace name is a DNS label too (at most 63 characters)."""

APP_NAME = "voicefleet-runtime"
MANAGED_BY = "voicefleet-operator"
PART_OF = "voicefleet"
COMPONENT = "worker"

ANNOTATION_CONFIG_HASH = "voicefleet.dev/config-hash"
"""On the pod template: hash of the runtime config; a new hash rolls the workers."""
ANNOTATION_SECRETS_HASH = "voicefleet.dev/secrets-hash"
"""On the pod template: hash of the referenced Secrets' data, so rotated keys roll the workers
(env vars from Secrets are read only when a container starts)."""

CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/voicefleet"
METRICS_DIR = "/var/run/voicefleet/metrics"
SPOOL_DIR = "/var/run/voicefleet/spool"
"""Call records waiting for delivery (an emptyDir: outlives job processes and container
restarts, not the pod; the worker delivers it before it exits)."""
SPOOL_DIR_ENV = "VOICEFLEET_SPOOL_DIR"
CONTAINER_NAME = "worker"
RUNTIME_COMMAND = ["python", "-m", "voicefleet_runtime", "start"]
RUN_AS_ID = 10001
"""The runtime image's non-root user; set numerically so kubelet can verify runAsNonRoot."""

TERMINATION_GRACE_MARGIN_SECONDS = 30
"""Grace beyond the drain timeout: time to close the last job and flush metrics after it."""

# Derived resources (see `derived_resources`).
BASE_MEMORY_MIB = 512
"""The worker's main process with the inference runner (VAD, turn detector) and its imports."""
CPU_BASE_MILLI = 100
CPU_PER_JOB_MILLI = 100
"""A call's CPU: local VAD and turn detection, audio resampling and the WebRTC stack; STT, LLM
and TTS run at the providers."""


def dispatch_name(namespace: str, name: str) -> str:
    """The agent name the workers register with LiveKit: unique across tenants because
    namespaces and names are DNS labels (no dots), so `<namespace>.<name>` cannot collide."""
    return f"{namespace}.{name}"


def worker_namespace(tenant_namespace: str) -> str:
    """The platform-owned namespace where tenant `tenant_namespace`'s workers run."""
    return f"{WORKER_NAMESPACE_PREFIX}{tenant_namespace}"


@dataclass(frozen=True)
class VoiceAgentRef:
    """Identity of the VoiceAgent being rendered."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> VoiceAgentRef:
        metadata = body["metadata"]
        return cls(str(metadata["name"]), str(metadata["namespace"]), str(metadata["uid"]))

    @property
    def dispatch_name(self) -> str:
        return dispatch_name(self.namespace, self.name)

    @property
    def worker_namespace(self) -> str:
        """Where the children live (`vf-<namespace>`)."""
        return worker_namespace(self.namespace)


@dataclass(frozen=True)
class ChildNames:
    service_account: str
    livekit_secret: str
    tenant_secrets: str
    config_map: str
    service: str
    pod_disruption_budget: str
    network_policy: str
    deployment: str

    @classmethod
    def of(cls, name: str) -> ChildNames:
        return cls(
            service_account=name,
            livekit_secret=f"{name}-livekit",
            tenant_secrets=f"{name}-secrets",
            config_map=f"{name}-config",
            service=f"{name}-metrics",
            pod_disruption_budget=name,
            network_policy=name,
            deployment=name,
        )


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's selector (immutable once created: never change these)."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name}


def labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        LABEL_COMPONENT: COMPONENT,
        LABEL_PART_OF: PART_OF,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_VOICE_AGENT: name,
    }


def child_labels(ref: VoiceAgentRef) -> dict[str, str]:
    """Labels of every child and worker pod: `labels` plus the VoiceAgent's namespace and uid."""
    return {
        **labels(ref.name),
        LABEL_VOICE_AGENT_NAMESPACE: ref.namespace,
        LABEL_VOICE_AGENT_UID: ref.uid,
    }


def owned_by(obj: Mapping[str, Any], ref: VoiceAgentRef) -> bool:
    """`obj` is a child of the VoiceAgent `ref` (its uid label; owner references cannot cross
    from the tenant namespace into the worker namespace)."""
    found = obj.get("metadata", {}).get("labels") or {}
    return bool(found.get(LABEL_VOICE_AGENT_UID) == ref.uid)


def owner_of(obj: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the VoiceAgent a child's labels name, None if not a child."""
    found = obj.get("metadata", {}).get("labels") or {}
    keys = (LABEL_VOICE_AGENT_NAMESPACE, LABEL_VOICE_AGENT, LABEL_VOICE_AGENT_UID)
    if not all(found.get(key) for key in keys):
        return None
    return str(found[keys[0]]), str(found[keys[1]]), str(found[keys[2]])


def _metadata(ref: VoiceAgentRef, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": ref.worker_namespace, "labels": child_labels(ref)}


# --- secrets the workers need -------------------------------------------------------------


def header_env_var(secret: str, key: str) -> str:
    """The environment variable that carries Secret `secret`'s `key` into the workers.

    Readable, and unique per (secret, key): the suffix hashes the exact pair, so two pairs that
    sanitise to the same text still get different variables.
    """
    readable = re.sub(r"[^A-Z0-9]+", "_", f"{secret}_{key}".upper()).strip("_")
    digest = hashlib.sha256(f"{secret}\0{key}".encode()).hexdigest()[:6].upper()
    return f"VOICEFLEET_SECRET_{readable}_{digest}"


@dataclass(frozen=True)
class SecretKeyUse:
    """A Secret key the spec refers to, and the field that refers to it (for error messages)."""

    secret: str
    key: str
    field: str

    @property
    def env_var(self) -> str:
        return header_env_var(self.secret, self.key)


def secret_key_uses(spec: VoiceAgentSpec) -> list[SecretKeyUse]:
    """Every header valueFrom.secretKeyRef in tools and MCP servers, in spec order."""
    uses: list[SecretKeyUse] = []

    def collect(headers: list[HttpHeaderSpec], path: str) -> None:
        for index, header in enumerate(headers):
            if header.value_from is not None:
                selector = header.value_from.secret_key_ref
                where = f"{path}.headers[{index}].valueFrom.secretKeyRef"
                uses.append(SecretKeyUse(selector.name, selector.key, where))

    for index, tool in enumerate(spec.tools):
        collect(tool.http.headers, f"spec.tools[{index}].http")
    for index, server in enumerate(spec.mcp_servers):
        collect(server.headers, f"spec.mcpServers[{index}]")
    webhook = records_webhook(spec)
    if webhook is not None:
        ref = webhook.signing_secret_ref
        uses.append(SecretKeyUse(ref.name, ref.key, "spec.callRecords.webhook.signingSecretRef"))
    recording = spec.call_records.recording if spec.call_records is not None else None
    if recording is not None:
        name = recording.credentials_secret_ref.name
        for key in (RECORDING_ACCESS_KEY_ID, RECORDING_SECRET_ACCESS_KEY):
            uses.append(SecretKeyUse(name, key, "spec.callRecords.recording.credentialsSecretRef"))
    return uses


def records_webhook(spec: VoiceAgentSpec) -> CallRecordWebhookSpec | None:
    return spec.call_records.webhook if spec.call_records is not None else None


def secrets_hash(secrets: Mapping[str, Mapping[str, str]]) -> str:
    """Hash of the data of the Secrets the workers read ({name: data}); order-independent."""
    canonical = json.dumps({k: dict(v) for k, v in secrets.items()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --- the runtime config -------------------------------------------------------------------


def _runtime_headers(headers: list[HttpHeaderSpec]) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = []
    for header in headers:
        if header.value_from is not None:
            selector = header.value_from.secret_key_ref
            rendered.append(
                {"name": header.name, "valueFromEnv": header_env_var(selector.name, selector.key)}
            )
        else:
            rendered.append({"name": header.name, "value": header.value})
    return rendered


def runtime_config(ref: VoiceAgentRef, spec: VoiceAgentSpec) -> RuntimeConfig:
    """The config the runtime loads: the spec minus everything Kubernetes-specific, plus who
    the agent is. Secret header values become `valueFromEnv` names (see header_env_var)."""
    tools = []
    for tool in spec.tools:
        wire = tool.wire()
        wire["http"]["headers"] = _runtime_headers(tool.http.headers)
        tools.append(wire)
    mcp_servers = []
    for server in spec.mcp_servers:
        wire = server.wire()
        wire["headers"] = _runtime_headers(server.headers)
        mcp_servers.append(wire)
    telephony: dict[str, Any] = {}
    if spec.telephony is not None:
        telephony = spec.telephony.wire()
        telephony.pop("inbound", None)  # the SIP trunk is the operator's business
    worker = spec.worker.wire()
    worker.pop("image", None)
    worker.pop("resources", None)
    document = {
        "tenant": ref.namespace,
        "name": ref.name,
        "dispatchName": ref.dispatch_name,
        "agents": [agent.wire() for agent in spec.agents],
        "entry": spec.entry,
        "pipeline": spec.pipeline.wire(),
        "tools": tools,
        "mcpServers": mcp_servers,
        "telephony": telephony,
        "worker": worker,
        "admission": admission_settings(spec),
        "overflow": spec.overflow.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    if spec.call_limits is not None:
        document["callLimits"] = spec.call_limits.wire()
    if spec.dtmf is not None:
        document["dtmf"] = spec.dtmf.wire()
    webhook = records_webhook(spec)
    if webhook is not None:
        hook = webhook.wire()
        del hook["signingSecretRef"]
        key_ref = webhook.signing_secret_ref
        hook["signingKeyFromEnv"] = header_env_var(key_ref.name, key_ref.key)
        document["callRecords"] = {"webhook": hook}
    recording = spec.call_records.recording if spec.call_records is not None else None
    if recording is not None:
        storage = recording.wire()
        del storage["credentialsSecretRef"]
        secret = recording.credentials_secret_ref.name
        storage["accessKeyIdFromEnv"] = header_env_var(secret, RECORDING_ACCESS_KEY_ID)
        storage["secretAccessKeyFromEnv"] = header_env_var(secret, RECORDING_SECRET_ACCESS_KEY)
        records: dict[str, Any] = document.setdefault("callRecords", {})  # type: ignore[assignment]
        records["recording"] = storage
    return parse_config(document)


def admission_settings(spec: VoiceAgentSpec) -> dict[str, Any]:
    """Each worker's agent-call budget as rendered: its capacity, lowered to the VoiceAgent's
    cap when that is smaller. Across pods the cap also bounds the replicas
    (scaling.max_replicas_within_cap)."""
    worker = spec.worker
    capacity = worker_capacity(worker.jobs_per_worker, worker.load_threshold)
    cap = spec.limits.max_concurrent_calls
    if cap is None or cap >= capacity:
        return {"limitReason": OverflowReason.CAPACITY.value}
    return {"maxAgentJobs": cap, "limitReason": OverflowReason.AGENT_LIMIT.value}


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (instructions) as literal blocks, so the ConfigMap reads like the
    VoiceAgent it came from."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # never &anchors: each object is written out in full


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> str:
    """Deterministic, readable YAML (sorted keys, literal blocks, no anchors)."""
    return yaml.dump(
        document, Dumper=_ReadableDumper, sort_keys=True, allow_unicode=True, width=100
    )


def config_yaml(config: RuntimeConfig) -> str:
    return dump_yaml(config.wire())


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- children -----------------------------------------------------------------------------


def render_service_account(ref: VoiceAgentRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ref, ChildNames.of(ref.name).service_account),
        "automountServiceAccountToken": False,
    }


def render_livekit_secret(ref: VoiceAgentRef, platform_data: Mapping[str, str]) -> dict[str, Any]:
    """The worker-namespace copy of the platform's LiveKit credentials (base64 `data`, as read)."""
    missing = [key for key in LIVEKIT_SECRET_KEYS if key not in platform_data]
    if missing:
        raise ValueError(f"the platform LiveKit Secret lacks key(s) {', '.join(missing)}")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ref, ChildNames.of(ref.name).livekit_secret),
        "type": "Opaque",
        "data": {key: platform_data[key] for key in LIVEKIT_SECRET_KEYS},
    }


def tenant_secret_data(
    spec: VoiceAgentSpec, secrets: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """The worker namespace's copy of what the workers read from the tenant's Secrets
    (`secrets`: {name: base64 data}, as read): every key of each spec.secretRefs Secret (the
    workers get them all as environment variables; a later Secret wins a shared key, as with
    envFrom) and each referenced key under its environment variable's name. Nothing else. A
    key missing from `secrets` is left out (the reconcile checked them all: check_secrets)."""
    data: dict[str, str] = {}
    for ref in spec.secret_refs:
        data.update(secrets.get(ref.name) or {})
    for use in secret_key_uses(spec):
        source = secrets.get(use.secret) or {}
        if use.key in source:
            data[use.env_var] = source[use.key]
    return data


def render_tenant_secret(
    ref: VoiceAgentRef, spec: VoiceAgentSpec, secrets: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """`<name>-secrets`: the tenant Secrets' values the workers use (tenant_secret_data)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ref, ChildNames.of(ref.name).tenant_secrets),
        "type": "Opaque",
        "data": tenant_secret_data(spec, secrets),
    }


def render_config_map(ref: VoiceAgentRef, text: str) -> dict[str, Any]:
    metadata = _metadata(ref, ChildNames.of(ref.name).config_map)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(text)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIG_KEY: text},
    }


def render_service(ref: VoiceAgentRef, spec: VoiceAgentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, ChildNames.of(ref.name).service),
        "spec": {
            # Headless: Prometheus scrapes every worker, not a load-balanced one.
            "clusterIP": "None",
            "selector": selector_labels(ref.name),
            "ports": [
                {
                    "name": "metrics",
                    "port": spec.worker.metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_pod_disruption_budget(ref: VoiceAgentRef) -> dict[str, Any]:
    """Evictions (node drains) take one worker at a time.

    An evicted worker is not a cut call: eviction sends SIGTERM, the worker drains (takes no new
    calls, finishes its own) within the grace period, and the ReplicaSet starts its replacement
    at once. What a PDB can protect is capacity, so it allows one worker down at a time. Only
    idle workers cannot be expressed, and `minAvailable: replicas` (or maxUnavailable 0) would
    block node drains forever, which platform teams cannot accept; a spare worker (spareJobs)
    covers the one being replaced. Pods that are not ready may always be evicted.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref, ChildNames.of(ref.name).pod_disruption_budget),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(ref.name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def render_network_policy(
    ref: VoiceAgentRef, spec: VoiceAgentSpec, settings: PlatformSettings
) -> dict[str, Any]:
    """Ingress from the platform namespace and its monitoring only; egress to DNS, LiveKit, the
    tenant's namespace and its worker namespace, what the VoiceAgent declares and the public
    internet (netpol.py)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ref, ChildNames.of(ref.name).network_policy),
        "spec": netpol.network_policy_spec(
            ref.namespace, selector_labels(ref.name), spec, settings
        ),
    }


def derived_resources(worker: WorkerSpec) -> dict[str, dict[str, str]]:
    """The worker container's resources, derived from the job capacity unless overridden.

    Every process (jobsPerWorker jobs plus idleProcesses warm ones) is planned at half its
    warning level; the limit lets each one reach its own kill limit (jobMemoryLimitMB), so
    livekit-agents, not the kernel's OOM killer, stops a runaway job and the other calls go on.
    Without a per-job limit (0) the limit is twice the warning level per process. No CPU limit:
    throttling shows up as speech latency. Fields set in worker.resources win, one by one.
    """
    processes = worker.jobs_per_worker + worker.idle_processes
    request_mib = BASE_MEMORY_MIB + processes * math.ceil(worker.job_memory_warn_mb / 2)
    per_process_limit = worker.job_memory_limit_mb or 2 * worker.job_memory_warn_mb
    limit_mib = max(request_mib, BASE_MEMORY_MIB + processes * per_process_limit)
    cpu_milli = CPU_BASE_MILLI + worker.jobs_per_worker * CPU_PER_JOB_MILLI
    requests: dict[str, str] = {"cpu": f"{cpu_milli}m", "memory": f"{request_mib}Mi"}
    limits: dict[str, str] = {"memory": f"{limit_mib}Mi"}
    if worker.resources is not None:
        for section, target in (
            (worker.resources.requests, requests),
            (worker.resources.limits, limits),
        ):
            if section is not None:
                for key, value in section.wire().items():
                    target[key] = str(value)
    return {"requests": requests, "limits": limits}


def _container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _environment(ref: VoiceAgentRef, spec: VoiceAgentSpec, settings: PlatformSettings) -> list:
    names = ChildNames.of(ref.name)
    env: list[dict[str, Any]] = [
        {"name": CONFIG_PATH_ENV, "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "LIVEKIT_URL", "value": settings.livekit_url},
    ]
    for key in LIVEKIT_SECRET_KEYS:
        env.append(
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": names.livekit_secret, "key": key}},
            }
        )
    env += [
        # Set before the process starts, as prometheus_client requires for job processes.
        {"name": "PROMETHEUS_MULTIPROC_DIR", "value": METRICS_DIR},
        # The root filesystem is read-only; caches and temporary files go to the /tmp volume.
        {"name": "HOME", "value": "/tmp"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    seen: set[str] = set()
    for use in secret_key_uses(spec):
        if use.env_var in seen:
            continue
        seen.add(use.env_var)
        env.append(
            {
                "name": use.env_var,
                "valueFrom": {"secretKeyRef": {"name": names.tenant_secrets, "key": use.env_var}},
            }
        )
    return env


def render_deployment(
    ref: VoiceAgentRef,
    spec: VoiceAgentSpec,
    settings: PlatformSettings,
    *,
    config_hash: str,
    secrets_hash: str,
    replicas: int,
) -> dict[str, Any]:
    names = ChildNames.of(ref.name)
    worker = spec.worker

    def http_get(path: str = "/", port: str = "health") -> dict[str, Any]:
        return {"path": path, "port": port, "scheme": "HTTP"}

    container = {
        "name": CONTAINER_NAME,
        "image": worker.image or settings.runtime_image,
        "imagePullPolicy": settings.runtime_image_pull_policy,
        "command": list(RUNTIME_COMMAND),
        "env": _environment(ref, spec, settings),
        # The copy of every spec.secretRefs key (render_tenant_secret).
        "envFrom": [{"secretRef": {"name": names.tenant_secrets}}],
        "ports": [
            {"name": "health", "containerPort": worker.health_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": worker.metrics_port, "protocol": "TCP"},
        ],
        # Loading models (VAD, turn detector) and connecting to LiveKit can take a while.
        "startupProbe": {
            "httpGet": http_get(),
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 60,
        },
        # Ready = registered with LiveKit and not draining (the runtime's /ready), so a
        # rollout retires an old worker only once its replacement can take calls.
        "readinessProbe": {
            "httpGet": http_get("/ready", "metrics"),
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # Lenient: a restart ends every call on the worker.
        "livenessProbe": {
            "httpGet": http_get(),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "resources": derived_resources(worker),
        "securityContext": _container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "metrics", "mountPath": METRICS_DIR},
        ],
    }
    if not spec.secret_refs:
        del container["envFrom"]
    spool_volumes: list[dict[str, Any]] = []
    if records_webhook(spec) is not None:
        env: list[dict[str, Any]] = container["env"]  # type: ignore[assignment]
        env.append({"name": SPOOL_DIR_ENV, "value": SPOOL_DIR})
        mounts: list[dict[str, Any]] = container["volumeMounts"]  # type: ignore[assignment]
        mounts.append({"name": "spool", "mountPath": SPOOL_DIR})
        spool_volumes.append({"name": "spool", "emptyDir": {}})
    template_annotations = {
        ANNOTATION_CONFIG_HASH: config_hash,
        ANNOTATION_SECRETS_HASH: secrets_hash,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(worker.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ref, names.deployment),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": selector_labels(ref.name)},
            # Surge, never unavailability: old workers keep their calls (and drain) while new
            # ones come up.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": child_labels(ref),
                    "annotations": template_annotations,
                },
                "spec": {
                    "serviceAccountName": names.service_account,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # A bare Service name in a tool or webhook URL means one of the tenant's
                    # Services, as it did when the workers ran in the tenant namespace.
                    "dnsConfig": {"searches": [f"{ref.namespace}.svc.{settings.cluster_domain}"]},
                    "terminationGracePeriodSeconds": (
                        worker.drain_timeout_seconds + TERMINATION_GRACE_MARGIN_SECONDS
                    ),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_ID,
                        "runAsGroup": RUN_AS_ID,
                        "fsGroup": RUN_AS_ID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector_labels(ref.name)},
                        }
                    ],
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "config",
                            "configMap": {
                                "name": names.config_map,
                                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                            },
                        },
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "metrics", "emptyDir": {}},
                        *spool_volumes,
                    ],
                },
            },
        },
    }


def render_horizontal_pod_autoscaler(ref: VoiceAgentRef, spec: VoiceAgentSpec) -> dict[str, Any]:
    """scaling.mode hpa: the HPA owns the replicas (scaling.py renders it)."""
    names = ChildNames.of(ref.name)
    return render_hpa(
        name=names.deployment,
        namespace=ref.worker_namespace,
        deployment_name=names.deployment,
        policy=ScalingPolicy.from_spec(spec),
        labels=child_labels(ref),
    )


def hpa_owns_replicas(spec: VoiceAgentSpec) -> bool:
    """An HPA is rendered, and sets the replicas, only in mode hpa without a pin."""
    return spec.scaling.mode == "hpa" and spec.scaling.replicas is None


# --- everything at once -------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """All children of one VoiceAgent, in the order they are applied."""

    config: RuntimeConfig
    config_hash: str
    children: list[dict[str, Any]] = field(default_factory=list)

    def child(self, kind: str) -> dict[str, Any]:
        return next(c for c in self.children if c["kind"] == kind)


def render_all(
    ref: VoiceAgentRef,
    spec: VoiceAgentSpec,
    settings: PlatformSettings,
    *,
    livekit_data: Mapping[str, str],
    secrets_hash: str,
    replicas: int,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> Rendered:
    """Every child; raises ConfigError (runtime config) or ValueError (LiveKit Secret).
    `secrets`: {tenant Secret name: base64 data} of the Secrets the spec refers to."""
    config = runtime_config(ref, spec)
    text = config_yaml(config)
    digest = config_hash(text)
    children = [
        render_service_account(ref),
        render_livekit_secret(ref, livekit_data),
        render_tenant_secret(ref, spec, secrets or {}),
        render_config_map(ref, text),
        render_service(ref, spec),
        render_pod_disruption_budget(ref),
        render_network_policy(ref, spec, settings),
        render_deployment(
            ref,
            spec,
            settings,
            config_hash=digest,
            secrets_hash=secrets_hash,
            replicas=replicas,
        ),
    ]
    if hpa_owns_replicas(spec):
        children.append(render_horizontal_pod_autoscaler(ref, spec))
    return Rendered(config=config, config_hash=digest, children=children)
