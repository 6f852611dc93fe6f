"""The operator in-process against a real kube-apiserver and kube-controller-manager.

Create (owned children appear; pods pass the `restricted` Pod Security Standard), update (a new
config hash and a rolled-out pod template), delete (the real garbage collector removes every
child), a missing Secret (ConfigValid=False naming the field, recovery when it appears), a bad
update (the last good children keep running), drift (a deleted Deployment comes back), a name
conflict (never taken over), a kill mid-reconcile (SIGKILL of a real operator process; the
restarted one converges with no duplicate or orphaned objects), and the chart's RBAC (the
operator runs as the chart's ServiceAccount with exactly the ClusterRole's verbs).
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client import rest as k8s_rest
from voicefleet_localdev import paths
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import render
from voicefleet_operator.api import VoiceAgentStatus
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime.config import parse_config
from voicefleet_testkit import conditions
from voicefleet_testkit.conditions import condition
from voicefleet_testkit.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "voiceagents.voicefleet.dev.yaml"
GROUP, VERSION, PLURAL = "voicefleet.dev", "v1alpha1", "voiceagents"
CHILD_KINDS = {
    # kind: (list function name on the typed API, API class)
    "ServiceAccount": ("list_namespaced_service_account", k8s.CoreV1Api),
    "Secret": ("list_namespaced_secret", k8s.CoreV1Api),
    "ConfigMap": ("list_namespaced_config_map", k8s.CoreV1Api),
    "Service": ("list_namespaced_service", k8s.CoreV1Api),
    "PodDisruptionBudget": ("list_namespaced_pod_disruption_budget", k8s.PolicyV1Api),
    "NetworkPolicy": ("list_namespaced_network_policy", k8s.NetworkingV1Api),
    "Deployment": ("list_namespaced_deployment", k8s.AppsV1Api),
}
LIVEKIT_KEY, LIVEKIT_SECRET = "devkey", "integration-secret-not-real"


# --- cluster fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(control_plane: ClusterHandle) -> ClusterHandle:
    """The control plane with the checked-in CRD applied and served."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/voiceagents.voicefleet.dev"
    )
    wait_for(
        "voiceagents in discovery",
        lambda: "voiceagents" in control_plane.kubectl("api-resources", f"--api-group={GROUP}"),
        timeout=60,
    )
    return control_plane


def _create_namespace(cluster: ClusterHandle, prefix: str, restricted: bool = False) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    labels = {}
    if restricted:
        # Pods that break the restricted Pod Security Standard are refused at creation.
        labels = {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
    k8s.CoreV1Api(cluster.api_client).create_namespace(
        k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels))
    )
    return name


def _create_secret(cluster: ClusterHandle, namespace: str, name: str, data: dict[str, str]) -> None:
    k8s.CoreV1Api(cluster.api_client).create_namespaced_secret(
        namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
    )


@pytest.fixture(scope="module")
def platform(cluster: ClusterHandle) -> Iterator[str]:
    """The operator's namespace, with the platform's LiveKit Secret."""
    namespace = _create_namespace(cluster, "vf-platform")
    _create_secret(
        cluster,
        namespace,
        "voicefleet-livekit",
        {"LIVEKIT_API_KEY": LIVEKIT_KEY, "LIVEKIT_API_SECRET": LIVEKIT_SECRET},
    )
    yield namespace
    k8s.CoreV1Api(cluster.api_client).delete_namespace(namespace)


@pytest.fixture
def tenant(cluster: ClusterHandle) -> Iterator[str]:
    """A tenant namespace (restricted PSS) with the provider keys and the webhook's Secret."""
    namespace = _create_namespace(cluster, "tenant", restricted=True)
    _create_secret(
        cluster,
        namespace,
        "provider-keys",
        {"OPENAI_API_KEY": "sk-x", "DEEPGRAM_API_KEY": "dg-x", "ELEVEN_API_KEY": "el-x"},
    )
    _create_secret(cluster, namespace, "acme-orders-api", {"authorization": "Bearer t0ken"})
    yield namespace
    core = k8s.CoreV1Api(cluster.api_client)
    core.delete_namespace(namespace)
    # Its worker namespace goes with its last VoiceAgent; one a test left behind goes here.
    try:
        core.delete_namespace(render.worker_namespace(namespace))
    except k8s_rest.ApiException as error:
        if error.status != 404:
            raise


def create_worker_namespace(cluster: ClusterHandle, tenant: str) -> str:
    """The tenant's worker namespace made ahead of the operator (which adopts it: it carries
    the tenant label), to put objects in it before the first reconcile."""
    name = render.worker_namespace(tenant)
    k8s.CoreV1Api(cluster.api_client).create_namespace(
        k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels={render.LABEL_TENANT: tenant}))
    )
    return name


def settings_for(platform: str, namespaces: tuple[str, ...], **overrides: Any) -> PlatformSettings:
    values: dict[str, Any] = {
        "livekit_url": "ws://127.0.0.1:7880",
        "livekit_secret_namespace": platform,
        # An image no node has, never pulled: the worker pods never start, whether or not the
        # cluster has a node, so readiness and replica counts are deterministic here.
        "runtime_image": "localhost/voicefleet/absent-runtime:never",
        "runtime_image_pull_policy": "Never",
        "watch_namespaces": namespaces,
        "recheck_invalid_seconds": 1.0,
        "resync_seconds": 3600.0,  # drift repair is tested through the watchers, not the timer
        "metrics_port": 0,
    }
    values.update(overrides)
    return PlatformSettings(**values)


def delete_agents(cluster: ClusterHandle, namespace: str) -> None:
    """Delete the namespace's VoiceAgents and wait until they are gone, while an operator still
    runs to release its finalizer (else the namespace could never be deleted)."""
    api = k8s.CustomObjectsApi(cluster.api_client)
    listed: Any = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    for item in listed["items"]:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"]
        )

    def gone() -> bool:
        remaining: Any = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return not remaining["items"]

    wait_for(f"the VoiceAgents in {namespace} to be deleted", gone, timeout=60)


@pytest.fixture
def operator(
    cluster: ClusterHandle, platform: str, tenant: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    running = OperatorProcess(
        settings_for(platform, (tenant,)), cluster.kubeconfig, tmp_path / "operator.log"
    ).start()
    try:
        yield running
        delete_agents(cluster, tenant)
    finally:
        stop_cleanly(running)


def stop_cleanly(operator: OperatorProcess) -> None:
    """Stop the operator as the kubelet would; a crash or an error exit fails the test."""
    status = operator.stop()
    assert status == 0, f"the operator exited with {status}:\n{operator.tail()}"


# --- helpers ---------------------------------------------------------------------------------


def example_spec() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "examples" / "voiceagent.yaml").read_text())
    spec = copy.deepcopy(document["spec"])
    spec.pop("telephony", None)  # phone numbers are the telephony code's, tested there
    spec["worker"]["drainTimeoutSeconds"] = 30
    spec["worker"]["jobsPerWorker"] = 2
    spec["worker"]["idleProcesses"] = 0
    spec["worker"]["jobMemoryWarnMB"] = 100
    spec["worker"]["jobMemoryLimitMB"] = 200
    # Pinned: the pods never start here (see settings_for), and these tests are about the reconcile,
    # not the autoscaler (tested in test_autoscaler.py).
    spec["scaling"]["replicas"] = 2
    return dict(spec)


def custom(cluster: ClusterHandle) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(cluster.api_client)


def create_agent(
    cluster: ClusterHandle, namespace: str, name: str, spec: dict[str, Any]
) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VoiceAgent",
        "metadata": {"name": name},
        "spec": spec,
    }
    created: Any = custom(cluster).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return dict(created)


def get_agent(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    found: Any = custom(cluster).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return dict(found)


def patch_spec(cluster: ClusterHandle, namespace: str, name: str, spec: dict[str, Any]) -> int:
    """Merge-patch the spec; returns the new generation."""
    result: Any = custom(cluster).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )
    return int(result["metadata"]["generation"])


def wait_condition(
    cluster: ClusterHandle,
    namespace: str,
    name: str,
    type: str,
    status: str,
    *,
    generation: int | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    return conditions.wait_condition(
        f"{namespace}/{name}",
        lambda: get_agent(cluster, namespace, name),
        type,
        status,
        generation=generation,
        timeout=timeout,
        interval=1.0,
    )


def list_children(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, list[Any]]:
    """The children of VoiceAgent `namespace/name`: in its worker namespace (vf-<namespace>)."""
    selector = f"{render.LABEL_VOICE_AGENT}={name}"
    found = {}
    for kind, (function, api_class) in CHILD_KINDS.items():
        api = api_class(cluster.api_client)
        found[kind] = getattr(api, function)(
            render.worker_namespace(namespace), label_selector=selector
        ).items
    return found


def assert_children_owned_once(
    cluster: ClusterHandle, namespace: str, agent: dict[str, Any]
) -> dict:
    """One child of each kind (two Secrets: the LiveKit key's copy and the tenant values'),
    labelled with the VoiceAgent's namespace, name and uid; nothing of it in the tenant
    namespace. Returns {kind: child}, the LiveKit copy as "Secret", the other "TenantSecrets"."""
    name, uid = agent["metadata"]["name"], agent["metadata"]["uid"]
    children = list_children(cluster, namespace, name)
    for kind, items in children.items():
        expected = 2 if kind == "Secret" else 1
        assert len(items) == expected, f"expected {expected} {kind} of {name}, found {len(items)}"
        for item in items:
            labels = item.metadata.labels or {}
            assert (
                labels.get(render.LABEL_VOICE_AGENT_NAMESPACE),
                labels.get(render.LABEL_VOICE_AGENT),
                labels.get(render.LABEL_VOICE_AGENT_UID),
            ) == (namespace, name, uid), f"{kind} {item.metadata.name} is not the VoiceAgent's"
            assert not item.metadata.owner_references
    in_tenant = {
        kind: getattr(api_class(cluster.api_client), function)(
            namespace, label_selector=f"{render.LABEL_VOICE_AGENT}={name}"
        ).items
        for kind, (function, api_class) in CHILD_KINDS.items()
    }
    assert not any(in_tenant.values()), f"children left in the tenant namespace: {in_tenant}"
    found = {kind: items[0] for kind, items in children.items()}
    secrets_ = {item.metadata.name: item for item in children["Secret"]}
    names = render.ChildNames.of(name)
    found["Secret"] = secrets_[names.livekit_secret]
    found["TenantSecrets"] = secrets_[names.tenant_secrets]
    return found


def replica_sets(cluster: ClusterHandle, namespace: str, name: str) -> list[Any]:
    """The worker ReplicaSets of VoiceAgent `namespace/name` (in its worker namespace)."""
    selector = ",".join(f"{k}={v}" for k, v in render.selector_labels(name).items())
    return list(
        k8s.AppsV1Api(cluster.api_client)
        .list_namespaced_replica_set(render.worker_namespace(namespace), label_selector=selector)
        .items
    )


def events_of(cluster: ClusterHandle, namespace: str, name: str) -> list[Any]:
    return list(
        k8s.CoreV1Api(cluster.api_client)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )


def wait_event(cluster: ClusterHandle, namespace: str, name: str, reason: str) -> Any:
    def probe() -> Any:
        return next((e for e in events_of(cluster, namespace, name) if e.reason == reason), None)

    return wait_for(f"event {reason} on {namespace}/{name}", probe, timeout=30)


# --- tests -----------------------------------------------------------------------------------


# kopf's line when the reconcile handler (create, update or resume) has run to the end.
RECONCILE_HANDLED = "Handler 'register.<locals>.reconcile_voiceagent' succeeded"


def operator_log(operator: OperatorProcess) -> str:
    return operator.log.read_text(errors="replace") if operator.log.exists() else ""


def test_create_gives_owned_children_and_true_status(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    created = create_agent(cluster, tenant, "support", example_spec())
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=1)
    children = assert_children_owned_once(cluster, tenant, created)

    status = agent["status"]
    assert status["dispatchName"] == f"{tenant}.support"
    assert status["observedGeneration"] == 1
    assert condition(agent, "ConfigValid")["status"] == "True"  # type: ignore[index]
    deployment = children["Deployment"]
    template_hash = deployment.spec.template.metadata.annotations[render.ANNOTATION_CONFIG_HASH]
    assert status["configHash"] == template_hash
    assert status["desiredReplicas"] == deployment.spec.replicas == 2  # the pin

    # The runtime config is valid for the runtime and holds no secret values.
    text = children["ConfigMap"].data[render.CONFIG_KEY]
    config = parse_config(yaml.safe_load(text))
    assert config.tenant == tenant and config.dispatch_name == f"{tenant}.support"
    for secret_value in ("Bearer t0ken", "sk-x", LIVEKIT_SECRET):
        assert secret_value not in text
    # The LiveKit credentials reached the worker namespace, never the tenant's; the tenant's
    # values the workers use were copied there, only the referenced ones.
    assert status["workerNamespace"] == render.worker_namespace(tenant)
    copied = children["Secret"].data
    assert base64.b64decode(copied["LIVEKIT_API_SECRET"]).decode() == LIVEKIT_SECRET
    core = k8s.CoreV1Api(cluster.api_client)
    for secret in core.list_namespaced_secret(tenant).items:
        values = [base64.b64decode(v).decode() for v in (secret.data or {}).values()]
        assert LIVEKIT_SECRET not in values, (
            f"the key is in {tenant}: {secret.to_dict()['metadata']}"
        )
    tenant_values = children["TenantSecrets"].data
    header_variable = render.header_env_var("acme-orders-api", "authorization")
    assert base64.b64decode(tenant_values[header_variable]).decode() == "Bearer t0ken"
    assert base64.b64decode(tenant_values["OPENAI_API_KEY"]).decode() == "sk-x"
    namespace_labels = core.read_namespace(render.worker_namespace(tenant)).to_dict()["metadata"][
        "labels"
    ]
    assert namespace_labels[render.LABEL_TENANT] == tenant
    assert namespace_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert children["ServiceAccount"].automount_service_account_token is False

    # The ReplicaSet controller created the pods under the restricted Pod Security Standard
    # (they never start: see settings_for); the watcher copied the counts into the status.
    agent = wait_for(
        "status.replicas from the Deployment",
        lambda: (a := get_agent(cluster, tenant, "support"))["status"].get("replicas") == 2 and a,
        timeout=60,
    )
    workers = condition(agent, "WorkersAvailable")
    assert workers is not None and workers["status"] == "False"
    assert workers["reason"] in ("WorkersStarting", "WorkersUnavailable")
    assert agent["status"]["readyReplicas"] == 0
    assert agent["status"]["phase"] in ("Progressing", "Degraded")
    assert condition(agent, "Ready")["status"] == "False"  # type: ignore[index]
    failed = [e for e in events_of(cluster, tenant, "support") if e.reason == "FailedCreate"]
    assert not failed
    wait_event(cluster, tenant, "support", "Created")

    # Kopf's bookkeeping is under voicefleet.dev/, never kopf's default prefix nor the status
    # (kopf records the handled creation once every creation handler has succeeded).
    annotations = wait_for(
        "kopf's record of the handled creation",
        lambda: (
            a
            if "voicefleet.dev/last-handled-configuration"
            in (a := get_agent(cluster, tenant, "support")["metadata"].get("annotations") or {})
            else None
        ),
        timeout=60,
    )
    assert not [key for key in annotations if "zalando" in key or key.startswith("kopf")]
    VoiceAgentStatus.model_validate(agent["status"])  # only typed fields (extra: forbid)

    # Applying again changes nothing: server-side apply of the same children is a no-op. The
    # Deployment and the PodDisruptionBudget are compared by generation (their spec): their
    # controllers write their status, and so their resourceVersion, whenever they get to it.
    by_generation = ("Deployment", "PodDisruptionBudget")
    versions = {
        k: c.metadata.resource_version for k, c in children.items() if k not in by_generation
    }
    handled = operator_log(operator).count(RECONCILE_HANDLED)
    custom(cluster).patch_namespaced_custom_object(
        GROUP, VERSION, tenant, PLURAL, "support", {"metadata": {"labels": {"touch": "1"}}}
    )
    # The cause has certainly happened: the operator ran its reconcile for the touch.
    wait_for(
        "the operator to reconcile the touched VoiceAgent",
        lambda: operator_log(operator).count(RECONCILE_HANDLED) > handled,
        timeout=60,
        describe=operator.tail,
    )
    again = assert_children_owned_once(cluster, tenant, created)
    assert {
        k: c.metadata.resource_version for k, c in again.items() if k not in by_generation
    } == versions
    assert again["Deployment"].metadata.generation == deployment.metadata.generation
    pdb = children["PodDisruptionBudget"]
    assert again["PodDisruptionBudget"].metadata.generation == pdb.metadata.generation


def test_config_change_rolls_out_a_new_pod_template(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    spec = example_spec()
    create_agent(cluster, tenant, "support", spec)
    first = wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=1)
    first_hash = first["status"]["configHash"]
    wait_for("the first ReplicaSet", lambda: len(replica_sets(cluster, tenant, "support")) == 1)

    # A scaling change alone does not touch the workers' config.
    generation = patch_spec(cluster, tenant, "support", {"scaling": {"maxReplicas": 5}})
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=generation)
    assert agent["status"]["configHash"] == first_hash

    spec["agents"][0]["greeting"] = "Welcome to Acme, this is the new greeting."
    generation = patch_spec(cluster, tenant, "support", {"agents": spec["agents"]})
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=generation)
    new_hash = agent["status"]["configHash"]
    assert new_hash != first_hash
    children = assert_children_owned_once(cluster, tenant, agent)
    assert "the new greeting" in children["ConfigMap"].data[render.CONFIG_KEY]
    template = children["Deployment"].spec.template
    assert template.metadata.annotations[render.ANNOTATION_CONFIG_HASH] == new_hash

    # The real deployment controller rolled the new template out as a new ReplicaSet.
    def rolled_out() -> bool:
        sets = replica_sets(cluster, tenant, "support")
        hashes = {
            rs.spec.template.metadata.annotations[render.ANNOTATION_CONFIG_HASH] for rs in sets
        }
        return len(sets) == 2 and hashes == {first_hash, new_hash}

    wait_for("a new ReplicaSet with the new config hash", rolled_out, timeout=60)
    event = wait_event(cluster, tenant, "support", "RollingOut")
    assert first_hash in event.message and new_hash in event.message


def test_delete_garbage_collects_every_child(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    create_agent(cluster, tenant, "support", example_spec())
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True")
    assert_children_owned_once(cluster, tenant, agent)
    wait_for("the worker ReplicaSet", lambda: replica_sets(cluster, tenant, "support"))

    custom(cluster).delete_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL, "support")

    def all_gone() -> bool:
        left = {k: len(v) for k, v in list_children(cluster, tenant, "support").items() if v}
        return not left and not replica_sets(cluster, tenant, "support")

    wait_for("the finalizer to remove every child", all_gone, timeout=90)
    workers = render.worker_namespace(tenant)
    wait_for(
        "worker pods to go",
        lambda: (
            not k8s.CoreV1Api(cluster.api_client)
            .list_namespaced_pod(workers, label_selector=f"{render.LABEL_VOICE_AGENT}=support")
            .items
        ),
        timeout=90,
    )

    # The tenant's last VoiceAgent gone: its worker namespace goes too.
    def namespace_gone() -> bool:
        try:
            found = k8s.CoreV1Api(cluster.api_client).read_namespace(workers)
        except k8s_rest.ApiException as error:
            if error.status == 404:
                return True
            raise
        return found.to_dict()["metadata"].get("deletion_timestamp") is not None

    wait_for(f"namespace {workers} to be deleted", namespace_gone, timeout=90)


def test_missing_secret_sets_config_valid_false_and_recovers(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    spec = example_spec()
    spec["secretRefs"] = [{"name": "late-keys"}]
    create_agent(cluster, tenant, "support", spec)
    agent = wait_condition(cluster, tenant, "support", "ConfigValid", "False", generation=1)
    invalid = condition(agent, "ConfigValid")
    assert invalid is not None and invalid["reason"] == "SecretNotFound"
    assert "spec.secretRefs[0].name: Secret 'late-keys' not found" in invalid["message"]
    assert agent["status"]["phase"] == "Failed"  # nothing ran before
    assert condition(agent, "Ready")["status"] == "False"  # type: ignore[index]
    assert not any(list_children(cluster, tenant, "support").values())
    event = wait_event(cluster, tenant, "support", "SecretNotFound")
    assert event.type == "Warning" and "spec.secretRefs[0].name" in event.message

    _create_secret(
        cluster,
        tenant,
        "late-keys",
        {"OPENAI_API_KEY": "sk-y", "DEEPGRAM_API_KEY": "dg-y", "ELEVEN_API_KEY": "el-y"},
    )
    started = time.monotonic()
    agent = wait_condition(cluster, tenant, "support", "ConfigValid", "True", timeout=30)
    recovery = time.monotonic() - started
    wait_condition(cluster, tenant, "support", "Reconciled", "True")
    assert_children_owned_once(cluster, tenant, agent)
    print(f"recovered {recovery:.1f}s after the Secret appeared")


def test_invalid_update_keeps_the_last_good_children(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    spec = example_spec()
    create_agent(cluster, tenant, "support", spec)
    good = wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=1)
    good_hash = good["status"]["configHash"]

    # Schema-valid, but the header names a key the Secret does not have.
    header = spec["tools"][0]["http"]["headers"][0]
    header["valueFrom"]["secretKeyRef"]["key"] = "no-such-key"
    generation = patch_spec(cluster, tenant, "support", {"tools": spec["tools"]})
    agent = wait_condition(
        cluster, tenant, "support", "ConfigValid", "False", generation=generation
    )
    invalid = condition(agent, "ConfigValid")
    assert invalid is not None and invalid["reason"] == "SecretKeyNotFound"
    assert invalid["message"].startswith(
        "spec.tools[0].http.headers[0].valueFrom.secretKeyRef.key: Secret 'acme-orders-api' "
        "has no key 'no-such-key' (its keys: authorization)"
    )
    assert agent["status"]["phase"] == "Degraded"  # the last good workers keep serving
    assert agent["status"]["configHash"] == good_hash
    children = assert_children_owned_once(cluster, tenant, agent)
    template = children["Deployment"].spec.template.metadata.annotations
    assert template[render.ANNOTATION_CONFIG_HASH] == good_hash
    assert "no-such-key" not in json.dumps(children["Deployment"].to_dict(), default=str)

    # A provider key that no listed Secret provides is caught too.
    spec["tools"][0]["http"]["headers"][0]["valueFrom"]["secretKeyRef"]["key"] = "authorization"
    spec["pipeline"]["stt"] = {"provider": "deepgram"}
    generation = patch_spec(cluster, tenant, "support", {"tools": spec["tools"], "secretRefs": []})
    agent = wait_condition(
        cluster, tenant, "support", "ConfigValid", "False", generation=generation
    )
    invalid = condition(agent, "ConfigValid")
    assert invalid is not None and invalid["reason"] == "ProviderKeyMissing"
    assert "spec.pipeline.stt.provider 'deepgram' needs" in invalid["message"]

    generation = patch_spec(cluster, tenant, "support", {"secretRefs": [{"name": "provider-keys"}]})
    wait_condition(cluster, tenant, "support", "ConfigValid", "True", generation=generation)
    wait_event(cluster, tenant, "support", "ConfigValid")


def test_a_tool_schema_no_provider_takes_is_config_valid_false_naming_the_field(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    """The API server cannot check a tool's JSON Schema below its top level (the property
    schemas are free-form there), so the operator does: nothing is rolled out, and the condition
    names the path inside the schema and the fix."""
    spec = example_spec()
    spec["tools"][0]["parameters"]["properties"]["order_number"]["type"] = "\x01"
    create_agent(cluster, tenant, "support", spec)
    agent = wait_condition(cluster, tenant, "support", "ConfigValid", "False", generation=1)
    invalid = condition(agent, "ConfigValid")
    assert invalid is not None and invalid["reason"] == "InvalidSpec"
    assert invalid["message"].startswith(
        "spec.tools[0].parameters.properties.order_number.type: '\\x01' is not a JSON Schema "
        "type; use one of array, boolean, integer, null, number, object, string"
    ), invalid["message"]
    assert list_children(cluster, tenant, "support")["Deployment"] == []


def test_cloud_only_noise_cancellation_is_refused_on_a_self_hosted_livekit(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    """bvc needs LiveKit Cloud (platform_features.py): with the platform's default
    livekit.cloud: false the operator rolls nothing out and names the field; mode none
    recovers."""
    spec = example_spec()
    spec["pipeline"]["noiseCancellation"] = {"mode": "bvc"}
    create_agent(cluster, tenant, "support", spec)
    agent = wait_condition(cluster, tenant, "support", "ConfigValid", "False", generation=1)
    invalid = condition(agent, "ConfigValid")
    assert invalid is not None and invalid["reason"] == "NeedsLiveKitCloud"
    assert invalid["message"].startswith(
        "spec.pipeline.noiseCancellation.mode: 'bvc' needs LiveKit Cloud"
    ), invalid["message"]
    assert list_children(cluster, tenant, "support")["Deployment"] == []
    generation = patch_spec(
        cluster, tenant, "support", {"pipeline": {"noiseCancellation": {"mode": "none"}}}
    )
    wait_condition(cluster, tenant, "support", "ConfigValid", "True", generation=generation)


def test_deleted_deployment_is_recreated(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    create_agent(cluster, tenant, "support", example_spec())
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True")
    old = assert_children_owned_once(cluster, tenant, agent)["Deployment"]
    k8s.AppsV1Api(cluster.api_client).delete_namespaced_deployment(
        "support", render.worker_namespace(tenant)
    )

    def recreated() -> bool:
        items = list_children(cluster, tenant, "support")["Deployment"]
        return len(items) == 1 and items[0].metadata.uid != old.metadata.uid

    wait_for("the operator to recreate the deleted Deployment", recreated, timeout=60)
    assert_children_owned_once(cluster, tenant, agent)


def test_a_name_taken_by_another_object_is_never_taken_over(
    cluster: ClusterHandle, tenant: str, operator: OperatorProcess
) -> None:
    core = k8s.CoreV1Api(cluster.api_client)
    workers = create_worker_namespace(cluster, tenant)
    core.create_namespaced_config_map(
        workers,
        k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="support-config"), data={"mine": "yes"}),
    )
    create_agent(cluster, tenant, "support", example_spec())
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "False")
    conflict = condition(agent, "Reconciled")
    assert conflict is not None and conflict["reason"] == "NameConflict"
    assert "ConfigMap 'support-config'" in conflict["message"]
    assert workers in conflict["message"]
    assert core.read_namespaced_config_map("support-config", workers).data == {"mine": "yes"}

    core.delete_namespaced_config_map("support-config", workers)
    agent = wait_condition(cluster, tenant, "support", "Reconciled", "True", timeout=30)
    assert_children_owned_once(cluster, tenant, agent)


# --- killed mid-reconcile --------------------------------------------------------------------


def test_killed_mid_reconcile_the_restarted_operator_converges(
    cluster: ClusterHandle, platform: str, tenant: str, tmp_path: Path
) -> None:
    core = k8s.CoreV1Api(cluster.api_client)
    settings = settings_for(platform, (tenant,))
    # A quota that refuses Deployments stops the reconcile between the other children and the
    # Deployment: a real half-done reconcile, deterministically.
    workers = create_worker_namespace(cluster, tenant)
    core.create_namespaced_resource_quota(
        workers,
        k8s.V1ResourceQuota(
            metadata=k8s.V1ObjectMeta(name="no-deployments"),
            spec=k8s.V1ResourceQuotaSpec(hard={"count/deployments.apps": "0"}),
        ),
    )
    first = OperatorProcess(settings, cluster.kubeconfig, tmp_path / "operator-1.log").launch()
    try:
        create_agent(cluster, tenant, "support", example_spec())
        try:
            agent = wait_condition(cluster, tenant, "support", "Reconciled", "False", timeout=90)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- operator log ---\n{first.tail()}") from None
        stuck = condition(agent, "Reconciled")
        assert stuck is not None and stuck["reason"] == "ApplyFailed"
        assert "Deployment 'support'" in stuck["message"]
        partial = {k: len(v) for k, v in list_children(cluster, tenant, "support").items()}
        assert partial["Deployment"] == 0 and partial["ConfigMap"] == 1
    finally:
        first.kill()  # SIGKILL: no cleanup, no last status write

    # While no operator runs: the quota goes and the spec changes.
    core.delete_namespaced_resource_quota("no-deployments", workers)
    spec = example_spec()
    spec["agents"][0]["greeting"] = "Changed while the operator was down."
    generation = patch_spec(cluster, tenant, "support", {"agents": spec["agents"]})

    # Then, several times: a fresh process catches up, a change arrives, and the process is
    # killed a moment later, inside the reconcile of that change. Where each kill landed is
    # read after it (nothing changes the status while no operator runs).
    cut: list[tuple[int, int | None]] = []
    for attempt, delay in enumerate((0.02, 0.1, 0.3)):
        log = tmp_path / f"operator-k{attempt}.log"
        proc = OperatorProcess(settings, cluster.kubeconfig, log).launch()
        try:
            try:
                wait_condition(
                    cluster, tenant, "support", "Reconciled", "True", generation=generation
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\n--- operator log ---\n{proc.tail()}") from None
            spec["agents"][1]["greeting"] = f"Billing, take {attempt}."
            generation = patch_spec(cluster, tenant, "support", {"agents": spec["agents"]})
            time.sleep(delay)
        finally:
            proc.kill()
        status = get_agent(cluster, tenant, "support")["status"]
        cut.append((generation, status.get("observedGeneration")))
    # At least one kill landed before the reconcile of its change finished (else this test
    # would only restart an operator with nothing left to do).
    assert any(observed != generation for generation, observed in cut), cut

    restarted = OperatorProcess(settings, cluster.kubeconfig, tmp_path / "operator-2.log").start()
    try:
        agent = wait_condition(
            cluster, tenant, "support", "Reconciled", "True", generation=generation, timeout=60
        )
        children = assert_children_owned_once(cluster, tenant, agent)
        text = children["ConfigMap"].data[render.CONFIG_KEY]
        assert "Changed while the operator was down." in text
        assert "Billing, take 2." in text  # the change whose reconcile was cut
        template = children["Deployment"].spec.template.metadata.annotations
        assert template[render.ANNOTATION_CONFIG_HASH] == agent["status"]["configHash"]
        # No orphan: every object labelled for this agent is owned by it (checked above for
        # the children; ReplicaSets belong to the one Deployment).
        deployment_uid = children["Deployment"].metadata.uid
        for replica_set in replica_sets(cluster, tenant, "support"):
            owners = replica_set.metadata.owner_references or []
            assert [o.uid for o in owners] == [deployment_uid]
        annotations = agent["metadata"].get("annotations") or {}
        assert not [key for key in annotations if "zalando" in key or key.startswith("kopf")]
        delete_agents(cluster, tenant)
    finally:
        stop_cleanly(restarted)


# --- the chart's RBAC ------------------------------------------------------------------------


def _helm_rbac(namespace: str) -> list[dict[str, Any]]:
    helm = paths.binary("helm")
    if not helm.exists():
        pytest.fail(f"helm is not built at {helm}; run `make infra`", pytrace=False)
    rendered = subprocess.run(
        [
            str(helm), "template", "vf", str(REPO / "charts" / "voicefleet"),
            "--namespace", namespace,
            "--set", "livekit.url=ws://127.0.0.1:7880",
            "--set", "livekit.existingSecret=voicefleet-livekit",
            "--set", "desk.enabled=false",
            "--show-only", "templates/serviceaccount.yaml",
            "--show-only", "templates/rbac.yaml",
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if rendered.returncode != 0:
        raise AssertionError(f"helm template failed:\n{rendered.stderr}")
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def test_operator_runs_with_exactly_the_charts_rbac(
    cluster: ClusterHandle,
    platform: str,
    tenant: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operator as the chart's ServiceAccount: everything it does is allowed by the
    ClusterRole (a missing verb fails this test with the API's 403 in the status)."""
    documents = _helm_rbac(platform)
    suffix = secrets.token_hex(3)
    for document in documents:
        if document["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            document["metadata"]["name"] += f"-{suffix}"  # cluster-scoped: unique per run
        if document["kind"] == "ClusterRoleBinding":
            document["roleRef"]["name"] += f"-{suffix}"
    manifest = tmp_path / "rbac.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    cluster.kubectl("apply", "-f", str(manifest))
    try:
        token = cluster.kubectl(
            "-n", platform, "create", "token", "vf-voicefleet", "--duration=1h"
        ).strip()
        admin = yaml.safe_load(cluster.kubeconfig.read_text())
        admin_cluster = admin["clusters"][0]
        restricted = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [admin_cluster],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "operator",
                    "context": {"cluster": admin_cluster["name"], "user": "operator"},
                }
            ],
            "current-context": "operator",
        }
        kubeconfig = tmp_path / "operator.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(restricted))
        # With leader election, as the chart runs it: the Role for the Lease is enough too.
        elected = settings_for(
            platform,
            (),
            livekit_secret_name="voicefleet-livekit",
            leader_election=True,
            lease_name=f"vf-rbac-{suffix}",
        )
        running = OperatorProcess(elected, kubeconfig, tmp_path / "operator-rbac.log").start()
        try:
            create_agent(cluster, tenant, "support", example_spec())
            agent = wait_condition(cluster, tenant, "support", "Reconciled", "True", timeout=60)
            assert_children_owned_once(cluster, tenant, agent)
            wait_for(
                "status.replicas through the Deployment watch",
                lambda: get_agent(cluster, tenant, "support")["status"].get("replicas") == 2,
                timeout=60,
            )
            wait_event(cluster, tenant, "support", "Created")  # events: create
            # The autoscaler ran too (pods: list, patch); a refusal anywhere is logged.
            agent = wait_for(
                "the autoscaler's ScalingActive condition",
                lambda: (
                    condition(a := get_agent(cluster, tenant, "support"), "ScalingActive") and a
                ),
                timeout=60,
            )
            delete_agents(cluster, tenant)
        finally:
            stop_cleanly(running)
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", str(manifest))
    refused = [
        r.getMessage()
        for r in caplog.records
        if "forbidden" in r.getMessage().lower() or " 403" in r.getMessage()
    ]
    assert not refused, "the chart's ClusterRole refused the operator:\n" + "\n".join(refused)


def test_rotated_secrets_roll_the_workers_within_seconds(
    cluster: ClusterHandle, platform: str, tenant: str, tmp_path: Path
) -> None:
    """Secrets are watched, not polled (the resync is an hour here): rotating a tenant Secret
    the spec names, or the platform's LiveKit key, changes the workers' pod template at once, so
    the Deployment rolls them. The operator watches the platform namespace too, as a cluster-wide
    operator does."""
    running = OperatorProcess(
        settings_for(platform, (tenant, platform)), cluster.kubeconfig, tmp_path / "operator.log"
    ).start()
    core = k8s.CoreV1Api(cluster.api_client)
    apps = k8s.AppsV1Api(cluster.api_client)
    try:
        create_agent(cluster, tenant, "support", example_spec())
        wait_condition(cluster, tenant, "support", "Reconciled", "True", generation=1)

        def secrets_hash() -> str:
            deployment = apps.read_namespaced_deployment("support", render.worker_namespace(tenant))
            metadata = deployment.spec.template.metadata
            assert metadata is not None and metadata.annotations is not None
            return str(metadata.annotations[render.ANNOTATION_SECRETS_HASH])

        first = secrets_hash()
        rotated_at = time.monotonic()
        core.patch_namespaced_secret(
            "provider-keys", tenant, {"stringData": {"OPENAI_API_KEY": "sk-rotated"}}
        )
        wait_for(
            "the workers' secrets hash to follow the rotated tenant Secret",
            lambda: secrets_hash() != first,
            timeout=30,
        )
        tenant_rotation_s = time.monotonic() - rotated_at
        second = secrets_hash()
        core.patch_namespaced_secret(
            "voicefleet-livekit", platform, {"stringData": {"LIVEKIT_API_SECRET": "rotated-too"}}
        )
        wait_for(
            "the workers' secrets hash to follow the rotated LiveKit key",
            lambda: secrets_hash() not in (first, second),
            timeout=30,
        )
        log = running.log.read_text()
        for secret in (f"{tenant}/provider-keys", f"{platform}/voicefleet-livekit"):
            assert f"Secret {secret} modified: reconciling 1 VoiceAgent(s)" in log, running.tail()
        print(f"tenant Secret rotated -> pod template changed: {tenant_rotation_s:.2f}s")
        delete_agents(cluster, tenant)
    finally:
        stop_cleanly(running)
