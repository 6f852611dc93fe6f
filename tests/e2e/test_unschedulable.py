"""Worker pods that cannot be scheduled, on the local cluster (issue 12): the VoiceAgent says so
and its callers are told, through the whole phone path (sipp -> livekit-sip -> livekit-server
-> the worker pod or the operator's standby).

  - a fleet none of whose pods fits the node (it requests more CPU than the node has):
    CapacityLimited=True/PodsUnschedulable within 30 s; no worker ever registers and none can
    start, so the operator's standby turns each caller away at once (not after
    VOICEFLEET_WAKE_TIMEOUT_SECONDS): a WebRTC caller gets the
    voicefleet.overflow=pods_unschedulable attribute, a phone caller 486 Busy Here (instead of
    ringing for the trunk's timeout, or silence for ever);
  - a fleet with one running worker whose second pod (a rollout's new one) cannot be scheduled:
    PodsUnschedulable; the running worker answers up to its budget (floor(jobsPerWorker x
    loadThreshold) = 1) and gives the next phone caller spec.overflow (486 with
    X-VoiceFleet-Overflow: capacity) at once.

Measured (printed, and in <state>/logs/unschedulable-e2e.json): the condition's delay, the
standby's treatment times, INVITE -> 486 beyond the running worker's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from voicefleet_localdev import paths
from voicefleet_localdev.livekit import LIVEKIT_PORT, LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator.render import selector_labels, worker_namespace
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime.admission import REPORT_PATH, WorkerReport
from voicefleet_testkit import conditions, sipcall
from voicefleet_testkit.conditions import condition
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer, openai_pipeline
from voicefleet_testkit.waiting import wait_for, wait_until

from tests.integration.test_overflow import final_response

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

WAKE_TIMEOUT_SECONDS = 8.0
OVERFLOW_ATTRIBUTE = "voicefleet.overflow"
TOO_MUCH_CPU = "64"  # more than the node has: the scheduler leaves the pod Pending
RESULTS = paths.logs_dir() / "unschedulable-e2e.json"


def fresh_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant(cluster_with_node: ClusterHandle, livekit: LiveKitEndpoint) -> Iterator[str]:
    """The tenant namespace, also holding the platform's LiveKit Secret for the operator."""
    namespace = f"unsched-{secrets.token_hex(3)}"
    cluster_with_node.kubectl("create", "namespace", namespace)
    for name, data in (
        (
            "voicefleet-livekit",
            {"LIVEKIT_API_KEY": livekit.api_key, "LIVEKIT_API_SECRET": livekit.api_secret},
        ),
        ("provider-keys", {"OPENAI_API_KEY": "sk-local-test-key"}),
    ):
        literals = [f"--from-literal={key}={value}" for key, value in data.items()]
        cluster_with_node.kubectl("-n", namespace, "create", "secret", "generic", name, *literals)
    yield namespace
    with contextlib.suppress(AssertionError):
        cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


@contextlib.contextmanager
def host_operator(
    cluster: ClusterHandle,
    livekit: LiveKitEndpoint,
    runtime_image: str,
    tenant: str,
    wake_timeout_seconds: float,
    log_name: str,
) -> Iterator[OperatorProcess]:
    """`python -m voicefleet_operator` on the host, serving `tenant` (which holds the platform's
    LiveKit Secret), with the given wake timeout; its VoiceAgents deleted at the end."""
    repo = paths.REPO_ROOT
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(repo / "crds"))
    settings = PlatformSettings(
        livekit_url=f"ws://{cluster.host_address_from_pods}:{LIVEKIT_PORT}",
        livekit_api_url=livekit.url,
        livekit_secret_name="voicefleet-livekit",
        livekit_secret_namespace=tenant,
        runtime_image=runtime_image,
        runtime_image_pull_policy="IfNotPresent",
        watch_namespaces=(tenant,),
        wake_timeout_seconds=wake_timeout_seconds,
        metrics_port=0,
    )
    running = OperatorProcess(settings, cluster.kubeconfig, paths.log_file(log_name)).start()
    try:
        yield running
    finally:
        with contextlib.suppress(AssertionError):
            cluster.kubectl("-n", tenant, "delete", "voiceagents", "--all", "--timeout=120s")
        running.stop()


@pytest.fixture(scope="module")
def operator(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    tenant: str,
) -> Iterator[OperatorProcess]:
    """The operator with a short wake timeout: no worker of these fleets ever registers."""
    with host_operator(
        cluster_with_node,
        livekit,
        project_images["runtime"],
        tenant,
        WAKE_TIMEOUT_SECONDS,
        "operator-unschedulable-e2e",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, Any]]:
    measured: dict[str, Any] = {}
    yield measured
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(measured, indent=2))
    print(f"\nunschedulable e2e measurements ({RESULTS}):\n{json.dumps(measured, indent=2)}")


# --- helpers --------------------------------------------------------------------------------


def voiceagent(name: str, providers_url: str, number: str, cpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": name},
        "spec": {
            "agents": [
                {"name": "front", "instructions": "You answer calls.", "greeting": "Hello there."}
            ],
            "entry": "front",
            "pipeline": openai_pipeline(providers_url),
            "secretRefs": [{"name": "provider-keys"}],
            "telephony": {
                "numbers": [number],
                # sipp and livekit-sip are host processes: the INVITE comes from loopback.
                "inbound": {"allowedAddresses": ["127.0.0.1"]},
            },
            "overflow": {"sip": {"action": "reject"}},
            "worker": {
                # One agent call per worker: floor(2 x 0.5).
                "jobsPerWorker": 2,
                "loadThreshold": 0.5,
                "idleProcesses": 1,
                "drainTimeoutSeconds": 30,
                "resources": {"requests": {"cpu": cpu}},
            },
            "scaling": {"replicas": 1, "targetLoad": 0.5},
        },
    }


def apply(cluster: ClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    path = paths.state_dir() / f"unschedulable-e2e-{namespace}-{manifest['metadata']['name']}.json"
    path.write_text(json.dumps(manifest))
    cluster.kubectl("-n", namespace, "apply", "-f", str(path))


def agent_json(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("-n", namespace, "get", "va", name, "-o", "json")))


def wait_condition(
    cluster: ClusterHandle,
    namespace: str,
    name: str,
    type: str,
    status: str,
    reason: str | None = None,
    timeout: float = 300,
) -> dict[str, Any]:
    """The condition, once it has `status` (and `reason`); the cluster's diagnostics if not."""
    agent = conditions.wait_condition(
        f"{namespace}/{name}",
        lambda: agent_json(cluster, namespace, name),
        type,
        status,
        reason=reason,
        timeout=timeout,
        describe=lambda: cluster.diagnostics(namespace),
    )
    found = condition(agent, type)
    assert found is not None
    return found


def status_code(packet: sipcall.SipPacket | None) -> int | None:
    return int(packet.first_line.split()[1]) if packet is not None else None


async def agent_calls(cluster: ClusterHandle, tenant: str, name: str, port: int) -> int:
    """Agent calls of the VoiceAgent's running workers, from their reports (GET /report)."""
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(name).items())
    pods = json.loads(
        cluster.kubectl("-n", worker_namespace(tenant), "get", "pods", "-l", selector, "-o", "json")
    )["items"]
    total = 0
    async with aiohttp.ClientSession() as session:
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                continue
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                url = f"http://{ip}:{port}{REPORT_PATH}"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    report = WorkerReport.model_validate_json(await response.read())
                    total += report.agent_jobs
    return total


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_fleet_whose_pods_cannot_be_scheduled_turns_its_callers_away(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    operator: OperatorProcess,
    tenant: str,
    pod_providers: ProviderServer,
    results: dict[str, Any],
    tmp_path: Path,
) -> None:
    name, number = "stuck", fresh_number()
    applied_at = time.monotonic()
    apply(cluster_with_node, tenant, voiceagent(name, pod_providers.base_url, number, TOO_MUCH_CPU))
    limited = await asyncio.to_thread(
        wait_condition,
        cluster_with_node,
        tenant,
        name,
        "CapacityLimited",
        "True",
        "PodsUnschedulable",
        30,
    )
    shown_s = time.monotonic() - applied_at
    assert "cannot be scheduled" in limited["message"], limited
    await asyncio.to_thread(
        wait_condition, cluster_with_node, tenant, name, "TelephonyReady", "True", None, 120
    )
    await asyncio.to_thread(
        wait_for,
        "the operator's standby registered",
        lambda: f"standby {tenant}.{name}: registered" in operator.log.read_text(errors="replace"),
        60,
    )

    # A WebRTC caller: told through its own attribute at once, with the reason (after the
    # wake timeout it would be wake_timeout: no wake can happen here).
    room = f"stuck-{secrets.token_hex(4)}"
    token = participant_token(
        livekit.api_key, livekit.api_secret, room, "caller", dispatch_agent=f"{tenant}.{name}"
    )
    async with TestParticipant(livekit.url, token) as caller:
        joined_at = time.monotonic()
        await wait_until(
            "the WebRTC caller told",
            lambda: (
                caller.room.local_participant.attributes.get(OVERFLOW_ATTRIBUTE)
                == "pods_unschedulable"
            ),
            WAKE_TIMEOUT_SECONDS + 30,
        )
        told_s = time.monotonic() - joined_at

    # A phone caller: 486 at once, never answered.
    result = await asyncio.to_thread(
        sipcall.place_call,
        "call.xml",
        number,
        tmp_path / "call",
        talk_seconds=3,
        answer_timeout=WAKE_TIMEOUT_SECONDS + 30,
    )
    final = final_response(result)
    assert status_code(final) == 486, result.describe()
    assert result.answered_at is None and not result.capture.pcmu_frames(), result.describe()
    assert final is not None and result.invite_at is not None
    rejected_s = final.at - result.invite_at
    turned_away = "was turned away at once"
    log_text = operator.log.read_text(errors="replace")
    assert log_text.count(turned_away) >= 2, "the standby did not say why it turned them away"
    results["no_worker"] = {
        "applied_to_pods_unschedulable_s": round(shown_s, 2),
        "wake_timeout_s": WAKE_TIMEOUT_SECONDS,
        "webrtc_caller_told_s": round(told_s, 2),
        "invite_to_486_s": round(rejected_s, 2),
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_callers_beyond_the_running_worker_get_the_overflow_treatment(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    operator: OperatorProcess,
    tenant: str,
    pod_providers: ProviderServer,
    results: dict[str, Any],
    tmp_path: Path,
) -> None:
    name, number = "half", fresh_number()
    manifest = voiceagent(name, pod_providers.base_url, number, "50m")
    apply(cluster_with_node, tenant, manifest)
    await asyncio.to_thread(
        wait_condition, cluster_with_node, tenant, name, "Ready", "True", None, 400
    )
    # A rollout whose new pod cannot be scheduled: the old worker keeps serving
    # (maxUnavailable 0), the fleet cannot have its second pod.
    manifest["spec"]["worker"]["resources"] = {"requests": {"cpu": TOO_MUCH_CPU}}
    changed_at = time.monotonic()
    apply(cluster_with_node, tenant, manifest)
    await asyncio.to_thread(
        wait_condition,
        cluster_with_node,
        tenant,
        name,
        "CapacityLimited",
        "True",
        "PodsUnschedulable",
        30,
    )
    shown_s = time.monotonic() - changed_at

    # The first caller gets the running worker's agent (its budget: 1 call) and holds it.
    metrics_port = 9100  # spec.worker.metricsPort's default
    first = asyncio.create_task(
        asyncio.to_thread(
            sipcall.place_call,
            "call.xml",
            number,
            tmp_path / "first",
            caller="+15550000001",
            talk_seconds=25,
            answer_timeout=60,
        )
    )

    async def answered() -> bool:
        return first.done() or await agent_calls(cluster_with_node, tenant, name, metrics_port) >= 1

    await wait_until("the first caller answered by the agent", answered, 90, interval=0.5)
    assert not first.done(), (await first).describe()
    # The next caller: the overflow treatment at once (486 with the reason).
    second = await asyncio.to_thread(
        sipcall.place_call,
        "call.xml",
        number,
        tmp_path / "second",
        caller="+15550000002",
        talk_seconds=3,
        answer_timeout=30,
    )
    final = final_response(second)
    assert status_code(final) == 486, second.describe()
    assert final is not None and second.invite_at is not None
    headers = final.text.partition("\r\n\r\n")[0]
    assert re.search(r"^X-VoiceFleet-Overflow:\s*capacity\s*$", headers, re.M | re.I), headers
    rejected_s = final.at - second.invite_at
    held = await first
    assert status_code(final_response(held)) == 200, held.describe()
    assert held.capture.voiced_seconds() > 1.0, held.describe()
    results["one_worker_running"] = {
        "change_to_pods_unschedulable_s": round(shown_s, 2),
        "invite_to_486_beyond_budget_s": round(rejected_s, 2),
        "invite_to_agent_first_audio_s": held.invite_to_first_audio,
    }
