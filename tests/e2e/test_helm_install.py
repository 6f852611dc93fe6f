"""The chart on the local cluster: `helm install` runs the operator image (built by `make images`)
as a pod on the node; `kubectl apply -f examples/voiceagent.yaml` gives the children; and
`kubectl get va` shows printer columns whose values match what the cluster really runs. The
chart's platform desk (a pod of the runtime image, reached by the operator pod through its
Service) answers a phone call to a fleet at zero with the holding message until the woken
worker pod's agent takes the call. A leader operator pod frozen on the node (SIGSTOP) is
replaced by the standby pod, which reconciles a change made meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from voicefleet_localdev import chart, images, paths
from voicefleet_localdev import cluster as local_cluster
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_testkit import conditions, sipcall
from voicefleet_testkit.providers import ProviderServer, openai_pipeline
from voicefleet_testkit.waiting import wait_for

from tests.integration.test_desk import ANSWER_BOUND_S, answered_by_the_desk, voiced_runs

# Building and importing the images (setup) alone can take many minutes on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2700)]

REPO = paths.REPO_ROOT
EXAMPLE = REPO / "examples" / "voiceagent.yaml"
AGENT = "acme-support"  # the example's name
WAKE_TIMEOUT_SECONDS = 150
SLEEPER = "sleeper"
HOLD_MESSAGE = "Thanks for calling. Your agent will be with you in a moment."
CHILDREN = ("serviceaccount", "secret", "configmap", "service", "poddisruptionbudget",
            "networkpolicy", "deployment")  # fmt: skip


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[tuple[str, str]]:
    """(platform namespace, tenant namespace); the tenant enforces the restricted PSS."""
    suffix = secrets.token_hex(3)
    platform, tenant = f"vf-system-{suffix}", f"acme-{suffix}"
    cluster_with_node.kubectl("create", "namespace", platform)
    cluster_with_node.kubectl("create", "namespace", tenant)
    cluster_with_node.kubectl(
        "label", "namespace", tenant, "pod-security.kubernetes.io/enforce=restricted"
    )
    yield platform, tenant
    for namespace in (tenant, platform):
        cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def desk_providers(cluster_with_node: ClusterHandle) -> AsyncIterator[ProviderServer]:
    """The provider servers on the host address pods reach: the desk's TTS and the sleeper's."""
    async with ProviderServer(cluster_with_node.host_address_from_pods, 0) as server:
        yield server


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: tuple[str, str],
    desk_providers: ProviderServer,
) -> Iterator[str]:
    """`helm install` of the chart (voicefleet_localdev.chart, as the demo), operator pod Ready."""
    platform, tenant = namespaces
    # A release name of its own: the ClusterRole is named after it, and the demo may have
    # installed the chart as "voicefleet" in another namespace.
    release = f"vf-e2e-{tenant.rsplit('-', 1)[-1]}"
    # Only this test's tenant: other tests run their own operators on their namespaces.
    values = chart.local_values(
        watch_namespaces=[tenant],
        livekit=livekit,
        log_level="DEBUG",
        desk_tts_url=desk_providers.base_url,
    )
    # A worker pod starts from zero in a minute or more on this loaded 2-core node.
    values["wakeTimeoutSeconds"] = WAKE_TIMEOUT_SECONDS
    with installed_chart(cluster_with_node, release, platform, values, tenants=[tenant]) as notes:
        assert "kubectl -n acme apply -f examples/voiceagent.yaml" in notes  # the NOTES
        yield release


def _json(cluster: ClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def test_example_voiceagent_runs_under_the_installed_chart(
    cluster_with_node: ClusterHandle, release: str, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    cluster = cluster_with_node
    platform, tenant = namespaces

    # The operator runs as two pods on the node, from the image `make images` built; exactly
    # one of them is active: the holder of the release's Lease.
    operator_pods = _json(
        cluster, "-n", platform, "get", "pods", "-l", "app.kubernetes.io/name=voicefleet-operator"
    )["items"]
    assert len(operator_pods) == 2, [p["metadata"]["name"] for p in operator_pods]
    for pod in operator_pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["containers"][0]["image"] == images.PROJECT_IMAGES["operator"]
    (lease,) = wait_for(
        "the operators' Lease",
        lambda: _json(cluster, "-n", platform, "get", "leases")["items"],
        timeout=60,
    )
    names = {p["metadata"]["name"] for p in operator_pods}
    assert lease["spec"].get("holderIdentity") in names, (lease["spec"], names)

    # The tenant's Secrets, as the example's comments and the chart's NOTES say.
    tenant_secrets = {
        "provider-keys": {
            "OPENAI_API_KEY": "sk-e2e",
            "DEEPGRAM_API_KEY": "dg-e2e",
            "ELEVEN_API_KEY": "el-e2e",
        },
        "acme-orders-api": {"authorization": "Bearer e2e"},
        "acme-sip-auth": {"username": "acme", "password": "e2e-password"},
    }
    for secret, data in tenant_secrets.items():
        literals = [f"--from-literal={key}={value}" for key, value in data.items()]
        cluster.kubectl("-n", tenant, "create", "secret", "generic", secret, *literals)
    # The example as users apply it, except for its phone number: numbers are unique across
    # tenants and LiveKit here is shared (the demo applies the same example), so this run
    # claims a number of its own instead of conflicting with, or taking, the example's.
    manifest = yaml.safe_load(EXAMPLE.read_text())
    number = "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))
    manifest["spec"]["telephony"]["numbers"] = [number]
    # And its CPU request: derived from 10 jobs per worker it is 1.1 CPU, more than the shared
    # two-CPU test node has free while other tests' workers run.
    manifest["spec"]["worker"]["resources"] = {"requests": {"cpu": "100m", "memory": "512Mi"}}
    manifest_file = tmp_path / "voiceagent.yaml"
    manifest_file.write_text(yaml.safe_dump(manifest))
    cluster.kubectl("-n", tenant, "apply", "-f", str(manifest_file))

    # Every child, exactly once (the Secrets: the LiveKit key's copy and the tenant values'),
    # in the tenant's worker namespace, labelled with the VoiceAgent's uid; none in the tenant's.
    workers = render.worker_namespace(tenant)

    def children_ready() -> dict[str, Any] | None:
        agent = _json(cluster, "-n", tenant, "get", "va", AGENT)
        uid = agent["metadata"]["uid"]
        selector = f"{render.LABEL_VOICE_AGENT}={AGENT}"
        found = {}
        for kind in CHILDREN:
            items = _json(cluster, "-n", workers, "get", kind, "-l", selector)["items"]
            if len(items) != (2 if kind == "secret" else 1):
                return None
            for item in items:
                labels = item["metadata"].get("labels") or {}
                assert labels.get(render.LABEL_VOICE_AGENT_UID) == uid, kind
                assert not item["metadata"].get("ownerReferences"), kind
            assert not _json(cluster, "-n", tenant, "get", kind, "-l", selector)["items"], kind
            found[kind] = items[0]
        return found

    try:
        children = wait_for("the example's children", children_ready, timeout=120)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.diagnostics(platform)}") from None
    assert (
        children["deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
        == (images.PROJECT_IMAGES["runtime"])
    )

    # The workers come up (restricted PSS, runtime image, LiveKit reachable from pods).
    try:
        wait_for(
            "the VoiceAgent to be Ready",
            lambda: _ready_condition(_json(cluster, "-n", tenant, "get", "va", AGENT)) == "True",
            timeout=300,
            interval=3,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.diagnostics(workers)}") from None

    # `kubectl get va`: the printer columns show what the cluster really runs.
    agent = _json(cluster, "-n", tenant, "get", "va", AGENT)
    table = cluster.kubectl("-n", tenant, "get", "va")
    header, _ = _table(table, AGENT)
    assert header == ["NAME", "READY", "REPLICAS", "JOBS", "CAPACITY", "NUMBERS", "AGE"], table
    wide = cluster.kubectl("-n", tenant, "get", "va", "-o", "wide")
    header, row = _table(wide, AGENT)
    columns = dict(zip(header, row, strict=True))
    pods = [
        p
        for p in _json(
            cluster, "-n", workers, "get", "pods", "-l", f"{render.LABEL_VOICE_AGENT}={AGENT}"
        )["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    ready_pods = [p for p in pods if _pod_ready(p)]
    assert columns["READY"] == "True"
    assert int(columns["REPLICAS"]) == len(pods) == agent["status"]["replicas"]
    assert agent["status"]["readyReplicas"] == len(ready_pods) >= 1
    assert columns["PHASE"] == "Ready"
    assert int(columns["DESIRED"]) == children["deployment"]["spec"]["replicas"]
    status = agent["status"]
    expected_jobs = str(status["activeJobs"]) if "activeJobs" in status else "<none>"
    assert columns["JOBS"] == expected_jobs
    assert columns["NUMBERS"] == status["numbers"] == number  # TelephonyReady gates Ready
    capacity = next(c for c in status["conditions"] if c["type"] == "CapacityLimited")
    assert columns["CAPACITY"] == capacity["reason"], (columns, capacity)
    # The short name and the category both list it.
    assert AGENT in cluster.kubectl("-n", tenant, "get", "voicefleet")
    assert columns["DISPATCH"] == f"{tenant}.{AGENT}" == agent["status"]["dispatchName"]
    assert columns["WORKERS"] == workers == agent["status"]["workerNamespace"]
    # The workers' logs where the docs say (operator/README.md, "Tenant isolation").
    logs = cluster.kubectl("-n", workers, "logs", f"deploy/{AGENT}", "--tail=-1")
    assert "registered with LiveKit" in logs, logs[-2000:]
    print(wide)


def _ready_condition(agent: dict[str, Any]) -> str | None:
    for condition in (agent.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Ready":
            return str(condition["status"])
    return None


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _table(text: str, name: str) -> tuple[list[str], list[str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].split()
    row = next(line.split() for line in lines[1:] if line.split()[0] == name)
    assert len(row) == len(header), f"cannot split the table into columns:\n{text}"
    return header, row


@pytest.mark.asyncio(loop_scope="session")
async def test_the_desk_answers_a_call_to_a_fleet_at_zero_until_its_agent_takes_it(
    cluster_with_node: ClusterHandle,
    release: str,
    namespaces: tuple[str, str],
    sip: SipEndpoint,
    desk_providers: ProviderServer,
    tmp_path: Path,
) -> None:
    cluster = cluster_with_node
    platform, tenant = namespaces
    desk_pods = _json(
        cluster, "-n", platform, "get", "pods", "-l", "app.kubernetes.io/name=voicefleet-desk"
    )["items"]
    assert len(desk_pods) == 1 and _pod_ready(desk_pods[0]), desk_pods
    assert desk_pods[0]["spec"]["containers"][0]["image"] == images.PROJECT_IMAGES["runtime"]

    cluster.kubectl(
        "-n", tenant, "create", "secret", "generic", "sleeper-keys",
        "--from-literal=OPENAI_API_KEY=sk-e2e-sleeper",
    )  # fmt: skip
    number = "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))
    manifest = {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": SLEEPER},
        "spec": {
            "agents": [{"name": "front", "instructions": "Help.", "greeting": "Hello there."}],
            "entry": "front",
            "pipeline": openai_pipeline(desk_providers.base_url),
            "secretRefs": [{"name": "sleeper-keys"}],
            # sipp and livekit-sip are host processes: the INVITE comes from loopback.
            "telephony": {"numbers": [number], "inbound": {"allowedAddresses": ["127.0.0.1"]}},
            "overflow": {"holdMessage": HOLD_MESSAGE},
            "worker": {"jobsPerWorker": 2, "resources": {"requests": {"cpu": "50m"}}},
            "scaling": {"minReplicas": 0, "maxReplicas": 1, "spareJobs": 0},
        },
    }
    manifest_file = tmp_path / "sleeper.yaml"
    manifest_file.write_text(yaml.safe_dump(manifest))
    cluster.kubectl("-n", tenant, "apply", "-f", str(manifest_file))
    try:

        def asleep_with_number() -> bool:
            agent = _json(cluster, "-n", tenant, "get", "va", SLEEPER)
            ready = conditions.condition(agent, "Ready") or {}
            telephony = conditions.condition(agent, "TelephonyReady") or {}
            return (
                ready.get("status") == "True"
                and ready.get("reason") == "Asleep"
                and telephony.get("status") == "True"
            )

        await asyncio.to_thread(wait_for, "the sleeper asleep, its number provisioned",
                                asleep_with_number, 120, 1.0)  # fmt: skip

        def operator_logs() -> str:
            return cluster.kubectl(
                "-n", platform, "logs", "-l", "app.kubernetes.io/name=voicefleet-operator",
                "--tail=-1", "--prefix",
            )  # fmt: skip

        # The leader's standby registers with the autoscaler's first evaluation.
        await asyncio.to_thread(
            wait_for,
            "the standby registered",
            lambda: f"standby {tenant}.{SLEEPER}: registered" in operator_logs(),
            60,
        )
        result = await asyncio.to_thread(
            sipcall.place_call,
            "call.xml",
            number,
            tmp_path / "call",
            talk_seconds=45,
            answer_timeout=30,
            timeout=WAKE_TIMEOUT_SECONDS + 90,
        )
        described = result.describe()
        answered_s = answered_by_the_desk(result)  # no ringing on while the pod starts
        runs = voiced_runs(result)
        assert runs and runs[0][0] <= ANSWER_BOUND_S + 0.5, (runs, described)
        assert len(runs) >= 2, (runs, described)  # the holding message, then the greeting
        assert "handed over to the fleet's first worker" in operator_logs()
        desk_log = cluster.kubectl("-n", platform, "logs", "deploy/" + f"{release}-voicefleet-desk")
        assert "left (handed_over)" in desk_log, desk_log[-2000:]
        texts = [str(r.get("text")) for r in desk_providers.requests("tts")]
        assert HOLD_MESSAGE in texts and "Hello there." in texts, texts
        print(
            f"desk (chart): INVITE -> answer {answered_s:.2f}s, -> holding message "
            f"{runs[0][0]:.2f}s, -> the agent's greeting {runs[1][0]:.2f}s (a pod started)"
        )
    finally:
        cluster.kubectl("-n", tenant, "delete", "va", SLEEPER, "--timeout=120s")


def test_the_standby_operator_pod_takes_over_from_a_frozen_leader_on_the_node(
    cluster_with_node: ClusterHandle, release: str, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    """The leader's operator process is frozen on the node (SIGSTOP: a hung process, or a
    leader cut off from the API server; no clean hand-over): the other pod takes the Lease
    within leaseSeconds + retrySeconds and reconciles a VoiceAgent changed after the freeze.
    Thawed, the old leader finds the Lease taken and restarts as the standby. (A SIGKILLed
    leader's container restarts at once and, with the pod's identity, takes its own Lease
    back: tests/integration/test_telephony_operator.py kills the leader's process for good.)"""
    cluster = cluster_with_node
    platform, tenant = namespaces
    name = "takeover"
    cluster.kubectl(
        "-n", tenant, "create", "secret", "generic", "takeover-keys",
        "--from-literal=OPENAI_API_KEY=sk-e2e-takeover",
    )  # fmt: skip
    manifest: dict[str, Any] = {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": name},
        "spec": {
            "agents": [{"name": "front", "instructions": "First version."}],
            "entry": "front",
            "pipeline": openai_pipeline("http://127.0.0.1:1/v1"),
            "secretRefs": [{"name": "takeover-keys"}],
            "scaling": {"replicas": 0},  # no pod: only the operator's reconcile is observed
        },
    }
    manifest_file = tmp_path / "takeover.yaml"
    manifest_file.write_text(yaml.safe_dump(manifest))
    cluster.kubectl("-n", tenant, "apply", "-f", str(manifest_file))

    def reconciled(generation: int) -> bool:
        agent = _json(cluster, "-n", tenant, "get", "va", name)
        return bool(
            agent["metadata"]["generation"] == generation
            and agent.get("status", {}).get("observedGeneration") == generation
        )

    def holder() -> str:
        lease = _json(cluster, "-n", platform, "get", "lease", f"{release}-voicefleet")
        return str(lease["spec"].get("holderIdentity") or "")

    frozen: list[int] = []
    try:
        wait_for("the VoiceAgent reconciled", lambda: reconciled(1), 120)
        leader = holder()
        pods = {
            p["metadata"]["name"]: p
            for p in _json(
                cluster, "-n", platform, "get", "pods", "-l",
                "app.kubernetes.io/name=voicefleet-operator",
            )["items"]
        }  # fmt: skip
        assert leader in pods, (leader, list(pods))
        (standby,) = set(pods) - {leader}
        restarts = pods[leader]["status"]["containerStatuses"][0]["restartCount"]
        frozen = local_cluster.pod_processes(pods[leader]["metadata"]["uid"], "voicefleet_operator")
        assert frozen, f"no operator process of pod {leader} on the node"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        # Changed while the leader is frozen: the next leader must reconcile it.
        manifest["spec"]["agents"][0]["instructions"] = "Second version."
        manifest_file.write_text(yaml.safe_dump(manifest))
        cluster.kubectl("-n", tenant, "apply", "-f", str(manifest_file))
        wait_for("the standby pod holding the Lease", lambda: holder() == standby, 90, 0.5)
        takeover_s = time.monotonic() - frozen_at
        wait_for("the change reconciled by the new leader", lambda: reconciled(2), 120)
        reconciled_s = time.monotonic() - frozen_at

        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []

        def restarted() -> bool:
            pod = _json(cluster, "-n", platform, "get", "pod", leader)
            status = pod["status"]["containerStatuses"][0]
            return bool(status["restartCount"] > restarts and status.get("ready"))

        # Thawed, it finds its renew deadline passed and the Lease taken: it exits (restarts).
        wait_for("the old leader restarted as a standby", restarted, 120)
        assert holder() == standby
        # leaseSeconds 15 + retrySeconds 2, and this loaded node's slack.
        assert takeover_s <= 45, takeover_s
        print(
            f"leader {leader} frozen on the node: {standby} took the Lease after "
            f"{takeover_s:.1f}s and reconciled the change after {reconciled_s:.1f}s"
        )
    finally:
        for pid in frozen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        cluster.kubectl("-n", tenant, "delete", "va", name, "--timeout=120s")
