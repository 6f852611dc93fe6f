"""A fleet scaled to zero wakes on a call, on the local cluster with real worker pods (issue 12
item 3): a VoiceAgent with minReplicas 0 sleeps (no pod, Ready=True/Asleep); a WebRTC caller
(token dispatch) and then a phone caller (sipp -> livekit-sip) each wake it: the operator's
standby holds the caller (the phone rings), the Deployment goes to one replica at once, the
worker pod starts and registers, the operator hands the call over, and the caller hears the
agent's greeting. Between the two calls the fleet goes back to sleep (no pod).

Measured (printed, and in <state>/logs/scale-from-zero-e2e.json): dispatch -> the agent's first
audio and INVITE -> the agent's first audio, from zero pods.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from voicefleet_localdev import paths
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator.render import selector_labels, worker_namespace
from voicefleet_testkit import sipcall
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer
from voicefleet_testkit.waiting import wait_for

from tests.e2e.test_unschedulable import (
    OVERFLOW_ATTRIBUTE,
    agent_json,
    apply,
    condition,
    fresh_number,
    host_operator,
    status_code,
    tenant,  # noqa: F401  (fixture)
    voiceagent,
    wait_condition,
)
from tests.integration.test_overflow import final_response

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

# A pod starts in seconds on an idle node, in a minute or more on this loaded 2-core one.
WAKE_TIMEOUT_SECONDS = 150.0
RESULTS = paths.logs_dir() / "scale-from-zero-e2e.json"
AGENT = "sleeper"


@pytest.fixture(scope="module")
def operator(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    tenant: str,  # noqa: F811
) -> Iterator[OperatorProcess]:
    with host_operator(
        cluster_with_node,
        livekit,
        project_images["runtime"],
        tenant,
        WAKE_TIMEOUT_SECONDS,
        "operator-scale-from-zero-e2e",
    ) as running:
        yield running


def worker_pods(cluster: ClusterHandle, tenant: str) -> list[dict[str, Any]]:  # noqa: F811
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(AGENT).items())
    listed = json.loads(
        cluster.kubectl("-n", worker_namespace(tenant), "get", "pods", "-l", selector, "-o", "json")
    )
    return list(listed["items"])


def replicas(cluster: ClusterHandle, tenant: str) -> int:  # noqa: F811
    deployment = json.loads(
        cluster.kubectl("-n", worker_namespace(tenant), "get", "deployment", AGENT, "-o", "json")
    )
    return int(deployment["spec"].get("replicas", 1))


def asleep(cluster: ClusterHandle, tenant: str) -> bool:  # noqa: F811
    ready = condition(agent_json(cluster, tenant, AGENT), "Ready") or {}
    return (
        ready.get("status") == "True"
        and ready.get("reason") == "Asleep"
        and replicas(cluster, tenant) == 0
        and not worker_pods(cluster, tenant)
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_call_wakes_a_fleet_at_zero_and_reaches_the_agent(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    operator: OperatorProcess,
    tenant: str,  # noqa: F811
    pod_providers: ProviderServer,
    tmp_path: Path,
) -> None:
    number = fresh_number()
    manifest = voiceagent(AGENT, pod_providers.base_url, number, "50m")
    manifest["spec"]["scaling"] = {
        "minReplicas": 0,
        "maxReplicas": 1,
        "spareJobs": 0,
        "targetLoad": 0.5,
        "scaleDownDelaySeconds": 5,
    }
    apply(cluster_with_node, tenant, manifest)
    await asyncio.to_thread(
        wait_condition, cluster_with_node, tenant, AGENT, "TelephonyReady", "True", None, 120
    )
    await asyncio.to_thread(
        wait_for, "the fleet asleep", lambda: asleep(cluster_with_node, tenant), 120, 1.0
    )
    await asyncio.to_thread(
        wait_for,
        "the operator's standby registered",
        lambda: f"standby {tenant}.{AGENT}: registered" in operator.log.read_text(errors="replace"),
        60,
    )

    # A WebRTC caller wakes it.
    room = f"zero-{secrets.token_hex(4)}"
    token = participant_token(
        livekit.api_key, livekit.api_secret, room, "caller", dispatch_agent=f"{tenant}.{AGENT}"
    )
    async with TestParticipant(livekit.url, token) as caller:
        dispatched_at = time.monotonic()  # joining with the token dispatches the agent
        agent = await caller.wait_for_participant(agent=True, timeout_s=WAKE_TIMEOUT_SECONDS)
        assert OVERFLOW_ATTRIBUTE not in agent.attributes, agent.attributes
        heard_at = await caller.wait_for_audio(agent.identity, timeout_s=60)
    webrtc_s = heard_at - dispatched_at
    assert f"room {room} handed over" in operator.log.read_text(errors="replace")

    # It goes back to sleep: no pod.
    await asyncio.to_thread(
        wait_for, "the fleet asleep again", lambda: asleep(cluster_with_node, tenant), 180, 1.0
    )

    # A phone caller wakes it: ringing, then the agent answers and greets.
    result = await asyncio.to_thread(
        sipcall.place_call,
        "call.xml",
        number,
        tmp_path / "call",
        talk_seconds=40,
        answer_timeout=WAKE_TIMEOUT_SECONDS + 10,
        timeout=WAKE_TIMEOUT_SECONDS + 90,
    )
    assert status_code(final_response(result)) == 200, result.describe()
    assert 180 in result.capture.responses(), result.describe()
    assert result.capture.voiced_seconds() > 1.0, result.describe()
    sip_s = result.invite_to_first_audio
    assert sip_s is not None, result.describe()
    measured = {
        "dispatch_to_agent_first_audio_from_zero_s": round(webrtc_s, 2),
        "invite_to_agent_first_audio_from_zero_s": round(sip_s, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(measured, indent=2))
    print(f"\nscale from zero ({RESULTS}): {json.dumps(measured)}")
