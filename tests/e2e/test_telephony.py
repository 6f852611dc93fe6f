"""Phone calls on the full stack: the chart's operator provisions LiveKit SIP, sipp dials.

The chart is installed (operator pod from `make images`), VoiceAgents run their workers as pods
on the node, the providers are the local OpenAI-compatible servers (voicefleet_testkit.providers),
and every
call goes sipp -> livekit-sip -> livekit-server -> the tenant's worker pod:

  - a VoiceAgent with a number is Ready with TelephonyReady=True; a call is answered, the caller
    hears the greeting (non-silent RTP, decoded off the wire), the STT server receives the
    caller's speech, the LLM sees the caller's and the dialled numbers, the call ends with a BYE;
  - a second tenant claiming the same number gets NumberConflict (and an Event); calls still go
    to the first tenant's agent;
  - the LLM calling transfer_to_human makes livekit-sip send the caller a REFER to transferTo;
  - deleting the VoiceAgent deletes its trunk and rule (livekit-api lists none) and the next
    call to the number is refused;
  - the operator pod deleted right after `kubectl apply` leaves exactly one trunk and one rule.

Measured (printed, and written to <state>/logs/telephony-e2e.json): `kubectl apply` to
TelephonyReady=True, and INVITE to the first audio of the greeting.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from voicefleet_localdev import chart, paths
from voicefleet_localdev import cluster as local_cluster
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render, telephony
from voicefleet_testkit import conditions, sipcall
from voicefleet_testkit.conditions import condition
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall, openai_pipeline
from voicefleet_testkit.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

RELEASE = "voicefleet-telephony"
AGENT = "phone"
CALLER = "+15550001111"
TRANSFER_TO = "+15559990000"
GREETING = "Thanks for calling Acme, this is the phone agent. How can I help?"
RESULTS = paths.logs_dir() / "telephony-e2e.json"


def fresh_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[tuple[str, str, str]]:
    """(platform, first tenant, second tenant)."""
    suffix = secrets.token_hex(3)
    created = (f"vf-tel-{suffix}", f"tel-a-{suffix}", f"tel-b-{suffix}")
    for namespace in created:
        cluster_with_node.kubectl("create", "namespace", namespace)
    yield created
    for namespace in created:
        cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    project_images: dict[str, str],
    namespaces: tuple[str, str, str],
) -> Iterator[str]:
    """`helm install` of the chart watching the two tenants; operator pod Ready."""
    platform, *tenants = namespaces
    # project_images (requested above) has built the images local_values names.
    values = chart.local_values(watch_namespaces=tenants, livekit=livekit, log_level="DEBUG")
    with installed_chart(cluster_with_node, RELEASE, platform, values, tenants=tenants):
        yield platform


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, Any]]:
    measured: dict[str, Any] = {}
    yield measured
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(measured, indent=2))
    print(f"\ntelephony e2e measurements ({RESULTS}):\n{json.dumps(measured, indent=2)}")


# --- helpers --------------------------------------------------------------------------------


def create_secret(cluster: ClusterHandle, namespace: str, name: str, data: dict[str, str]) -> None:
    literals = [f"--from-literal={key}={value}" for key, value in data.items()]
    cluster.kubectl("-n", namespace, "create", "secret", "generic", name, *literals)


def apply(cluster: ClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    path = paths.state_dir() / f"telephony-e2e-{namespace}-{manifest['metadata']['name']}.json"
    path.write_text(json.dumps(manifest))
    cluster.kubectl("-n", namespace, "apply", "-f", str(path))


def phone_agent(providers_url: str, number: str) -> dict[str, Any]:
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": AGENT},
        "spec": {
            "agents": [
                {
                    "name": "front",
                    "instructions": (
                        "You answer Acme's phone. The caller's number is {caller_number}; "
                        "they dialled {dialed_number}. Transfer to a human when asked."
                    ),
                    "greeting": GREETING,
                }
            ],
            "entry": "front",
            "pipeline": openai_pipeline(providers_url),
            "telephony": {
                "numbers": [number],
                # sipp and livekit-sip are both host processes: the INVITE comes from loopback.
                "inbound": {"allowedAddresses": ["127.0.0.1"]},
                "transferTo": TRANSFER_TO,
            },
            "secretRefs": [{"name": "provider-keys"}],
            "worker": {
                "jobsPerWorker": 2,
                "idleProcesses": 1,
                "drainTimeoutSeconds": 30,
                # One call at a time: a small CPU request fits beside the other tests' pods
                # on the one-node cluster.
                "resources": {"requests": {"cpu": "50m"}},
            },
            "scaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }


def agent_json(cluster: ClusterHandle, namespace: str, name: str = AGENT) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("-n", namespace, "get", "va", name, "-o", "json")))


def wait_condition(
    cluster: ClusterHandle, namespace: str, type: str, status: str, timeout: float = 300
) -> dict[str, Any]:
    return conditions.wait_condition(
        f"{namespace}/{AGENT}",
        lambda: agent_json(cluster, namespace),
        type,
        status,
        timeout=timeout,
        describe=lambda: cluster.diagnostics(namespace),
    )


async def livekit_objects(
    livekit: LiveKitEndpoint, namespace: str
) -> tuple[list[api.SIPInboundTrunkInfo], list[api.SIPDispatchRuleInfo]]:
    """The VoiceAgent's trunks and dispatch rules as livekit-api lists them."""
    return await livekit.sip_objects_named(telephony.object_name(namespace, AGENT))


def assert_registered(cluster: ClusterHandle, namespace: str) -> None:
    """A worker pod of the VoiceAgent (in the tenant's worker namespace) has logged its
    registration with LiveKit."""
    selector = f"{render.LABEL_VOICE_AGENT}={AGENT}"
    workers = render.worker_namespace(namespace)
    logs = cluster.kubectl("-n", workers, "logs", "-l", selector, "--tail=-1")
    assert "registered with LiveKit" in logs, f"{logs[-3000:]}\n{cluster.diagnostics(workers)}"


def call_seconds(cluster: ClusterHandle, namespace: str) -> float:
    """voicefleet_call_seconds_total of the VoiceAgent, summed over its worker pods."""
    pods = json.loads(
        cluster.kubectl(
            "-n",
            render.worker_namespace(namespace),
            "get",
            "pods",
            "-l",
            f"{render.LABEL_VOICE_AGENT}={AGENT}",
            "-o",
            "json",
        )
    )["items"]
    total = 0.0
    pattern = re.compile(
        rf'^voicefleet_call_seconds_total{{[^}}]*tenant="{namespace}"[^}}]*}} (\S+)$', re.M
    )
    for pod in pods:
        address = pod["status"].get("podIP")
        if not address:
            continue
        with urllib.request.urlopen(f"http://{address}:9100/metrics", timeout=5) as response:
            text = response.read().decode()
        total += sum(float(value) for value in pattern.findall(text))
    return total


async def room_names(livekit: LiveKitEndpoint) -> set[str]:
    async with livekit.api() as lkapi:
        listed = await lkapi.room.list_rooms(api.ListRoomsRequest())
    return {room.name for room in listed.rooms}


async def rooms_during(livekit: LiveKitEndpoint, stop: asyncio.Event) -> set[str]:
    """Names of the rooms that existed while a call ran."""
    seen: set[str] = set()
    async with livekit.api() as lkapi:
        while not stop.is_set():
            listed = await lkapi.room.list_rooms(api.ListRoomsRequest())
            seen.update(room.name for room in listed.rooms)
            await asyncio.sleep(0.2)
    return seen


async def call(
    livekit: LiveKitEndpoint, scenario: str, number: str, workdir: Path, **options: Any
) -> tuple[sipcall.CallResult, set[str]]:
    """Places a call with sipp; returns its result and the rooms created while it ran."""
    # Rooms of earlier calls linger until LiveKit's empty timeout: they are not this call's.
    before = await room_names(livekit)
    stop = asyncio.Event()
    watcher = asyncio.create_task(rooms_during(livekit, stop))
    try:
        result = await asyncio.to_thread(
            sipcall.place_call, scenario, number, workdir, caller=CALLER, **options
        )
    finally:
        stop.set()
    return result, await watcher - before


# --- the tests ------------------------------------------------------------------------------


async def test_phone_numbers_end_to_end(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    release: str,
    namespaces: tuple[str, str, str],
    pod_providers: ProviderServer,
    results: dict[str, Any],
    tmp_path: Path,
) -> None:
    cluster = cluster_with_node
    _, first, second = namespaces
    number = fresh_number()
    for tenant in (first, second):
        create_secret(cluster, tenant, "provider-keys", {"OPENAI_API_KEY": "sk-e2e"})

    # 1. The first tenant's VoiceAgent: TelephonyReady, then Ready (its worker pod is up).
    applied = time.monotonic()
    apply(cluster, first, phone_agent(pod_providers.base_url, number))
    agent = await asyncio.to_thread(wait_condition, cluster, first, "TelephonyReady", "True", 120)
    results["apply_to_telephony_ready_seconds"] = round(time.monotonic() - applied, 2)
    status = agent["status"]
    trunks, rules = await livekit_objects(livekit, first)
    assert [t.sip_trunk_id for t in trunks] == [status["telephony"]["trunkID"]]
    assert [r.sip_dispatch_rule_id for r in rules] == [status["telephony"]["dispatchRuleID"]]
    assert status["numbers"] == number
    agent = await asyncio.to_thread(wait_condition, cluster, first, "Ready", "True", 400)
    results["apply_to_ready_seconds"] = round(time.monotonic() - applied, 2)
    # Ready means registered: a dispatch to a name no worker has registered yet is dropped, so
    # a pod Ready before its registration would lose the first calls.
    assert_registered(cluster, first)
    table = cluster.kubectl("-n", first, "get", "va", AGENT)
    assert number in table, table  # the Numbers printer column

    # 2. A call: answered by the agent, greeting heard, caller heard, ended with a BYE.
    pod_providers.reset()
    pod_providers.script_transcripts("Where is my order?")
    pod_providers.script_llm(LLMReply(text="Your order ships tomorrow.", after="user"))
    result, rooms = await call(
        livekit, "call.xml", number, tmp_path / "call", talk_seconds=14, speech_delay=5.0
    )
    assert result.returncode == 0, result.describe()
    assert result.answered_at is not None, result.describe()
    # Dialled at 127.0.0.1: the 200 OK sends the ACK, BYE and RTP nowhere else.
    assert result.capture.advertised_addresses() == {
        "contact": ["127.0.0.1"],
        "sdp_connection": ["127.0.0.1"],
        "sdp_origin": ["127.0.0.1"],
    }, result.describe()
    assert result.capture.voiced_seconds() > 1.0, result.describe()
    greeting_latency = result.invite_to_first_audio
    assert greeting_latency is not None
    results["invite_to_first_greeting_audio_seconds"] = round(greeting_latency, 3)
    assert result.capture.sent("BYE") and result.capture.responses()[-1] == 200, result.describe()
    assert any(r.startswith(f"call_{first}_{AGENT}_{CALLER}_") for r in rooms), rooms
    heard = [r for r in pod_providers.requests("stt") if not r["silent"]]
    assert heard, f"the STT server got no speech: {pod_providers.requests('stt')}"
    chats = pod_providers.requests("chat")
    assert chats, "the LLM was never asked"
    prompt = json.dumps(chats[0])
    assert CALLER in prompt and number in prompt, prompt[:2000]
    assert "transfer_to_human" in prompt and "end_call" in prompt
    # The call's seconds are in the usage metrics a tenant is billed from.
    seconds = await asyncio.to_thread(
        wait_for,
        f"voicefleet_call_seconds_total >= 5 for {first}/{AGENT}",
        lambda: (value := call_seconds(cluster, first)) >= 5.0 and value,
        30,
    )
    results["call_seconds_counted"] = round(seconds, 1)

    # 3. Another tenant claims the number: NumberConflict, and calls still reach the first.
    apply(cluster, second, phone_agent(pod_providers.base_url, number))
    contested = await asyncio.to_thread(
        wait_condition, cluster, second, "TelephonyReady", "False", 120
    )
    found = condition(contested, "TelephonyReady")
    assert found is not None and found["reason"] == "NumberConflict", found
    assert number in found["message"] and f"{first}/{AGENT}" in found["message"]
    events = cluster.kubectl(
        "-n", second, "get", "events", "--field-selector", f"involvedObject.name={AGENT}"
    )
    assert "NumberConflict" in events, events
    assert await livekit_objects(livekit, second) == ([], [])
    pod_providers.reset()
    # A new job process may have to start first (the pre-warmed one took the first call).
    result, rooms = await call(livekit, "call.xml", number, tmp_path / "call-2", talk_seconds=15)
    assert result.answered_at is not None and result.capture.voiced_seconds() > 1.0, (
        result.describe()
    )
    assert any(r.startswith(f"call_{first}_") for r in rooms), rooms
    assert not any(r.startswith(f"call_{second}_") for r in rooms), rooms

    # 4. Transfer to a human: the LLM calls the tool, livekit-sip sends the caller a REFER.
    pod_providers.reset()
    pod_providers.script_transcripts("I want to talk to a person.")
    pod_providers.script_llm(
        LLMReply(
            text="Let me transfer you.",
            tool_calls=[ToolCall("transfer_to_human", {"reason": "the caller asked"})],
            after="user",
        ),
        LLMReply(text="", after="tool"),
    )
    result, _ = await call(
        livekit, "call_transfer.xml", number, tmp_path / "transfer", speech_delay=5.0
    )
    refers = result.capture.received_requests("REFER")
    assert len(refers) == 1, result.describe()
    assert re.search(rf"^Refer-To:\s*<?tel:\{TRANSFER_TO}>?", refers[0].text, re.M | re.I), refers[
        0
    ].text
    assert result.returncode == 0, result.describe()

    # 5. Deleting the VoiceAgents deletes their trunk and rule; the number is then refused.
    cluster.kubectl("-n", second, "delete", "va", AGENT, "--wait=true", timeout=120)
    cluster.kubectl("-n", first, "delete", "va", AGENT, "--wait=true", timeout=120)
    assert await livekit_objects(livekit, first) == ([], [])
    assert await livekit_objects(livekit, second) == ([], [])
    result, rooms = await call(
        livekit, "call.xml", number, tmp_path / "after-delete", answer_timeout=8
    )
    finals = [code for code in result.capture.responses() if code >= 200]
    assert finals in ([], [404]), result.describe()
    assert result.answered_at is None and not result.capture.pcmu_frames(), result.describe()
    assert not rooms


def crash_leader_once_trunk_exists(
    cluster: ClusterHandle, livekit: LiveKitEndpoint, platform: str, namespace: str
) -> str:
    """Freeze the leader operator's process as soon as LiveKit lists the VoiceAgent's trunk,
    SIGKILL it, and say where it stopped: "trunk created, not recorded" or "already recorded"."""
    leases = json.loads(cluster.kubectl("-n", platform, "get", "leases", "-o", "json"))["items"]
    (lease,) = [item for item in leases if item["metadata"]["name"].startswith(RELEASE)]
    leader = json.loads(
        cluster.kubectl("-n", platform, "get", "pod", lease["spec"]["holderIdentity"], "-o", "json")
    )
    pids = local_cluster.pod_processes(leader["metadata"]["uid"], "voicefleet_operator")
    assert pids, f"no operator process of the leader {leader['metadata']['name']} on the node"
    deadline = time.monotonic() + 120
    while not asyncio.run(livekit_objects(livekit, namespace))[0]:
        assert time.monotonic() < deadline, "the operator created no trunk within 120 s"
        time.sleep(0.01)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        status = agent_json(cluster, namespace).get("status") or {}
        recorded = bool((status.get("telephony") or {}).get("trunkID"))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    return "already recorded" if recorded else "trunk created, not recorded"


def test_operator_restarted_during_provisioning_leaves_one_trunk_and_one_rule(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    release: str,
    namespaces: tuple[str, str, str],
    results: dict[str, Any],
) -> None:
    cluster = cluster_with_node
    platform, first, _ = namespaces
    selector = "app.kubernetes.io/name=voicefleet-operator"
    # No call is placed: the providers' address is never used.
    manifest = phone_agent("http://127.0.0.1:9/v1", fresh_number())
    with_secret = cluster.kubectl("-n", first, "get", "secret", "--ignore-not-found", "-o", "name")
    if "provider-keys" not in with_secret:
        create_secret(cluster, first, "provider-keys", {"OPENAI_API_KEY": "sk-e2e"})
    # The leader crashes (SIGKILL on the node) in the window issue 15 named: LiveKit holds the
    # VoiceAgent's trunk, and status.telephony does not record it yet. The process is frozen
    # (SIGSTOP) the moment the trunk is listed, the state it stopped in is read, then it is
    # killed: the kill point is observed, not hoped for. Missed (the status was written within
    # the polling interval): the VoiceAgent is deleted and the run tried again.
    kill_points: list[str] = []
    while len(kill_points) < 5:
        apply(cluster, first, manifest)
        kill_points.append(crash_leader_once_trunk_exists(cluster, livekit, platform, first))
        if kill_points[-1] == "trunk created, not recorded":
            break
        cluster.kubectl("-n", first, "delete", "va", AGENT, "--wait=true", timeout=180)
    assert kill_points[-1] == "trunk created, not recorded", kill_points
    results["operator_crash_kill_points"] = kill_points
    restarted = time.monotonic()
    agent = wait_condition(cluster, first, "TelephonyReady", "True", timeout=300)
    results["operator_restart_to_telephony_ready_seconds"] = round(time.monotonic() - restarted, 2)
    trunks, rules = asyncio.run(livekit_objects(livekit, first))
    assert (len(trunks), len(rules)) == (1, 1)
    assert agent["status"]["telephony"]["trunkID"] == trunks[0].sip_trunk_id
    # Once more, with the new pod: a second restart changes nothing.
    cluster.kubectl("-n", platform, "delete", "pod", "-l", selector, "--wait=true", timeout=120)
    cluster.kubectl(
        "-n",
        platform,
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        selector,
        "--timeout=180s",
        timeout=200,
    )
    # The cause has certainly happened: the new leader ran its telephony resume handler (the
    # new pods' logs hold only what they did since the restart).
    wait_for(
        "the new operator's telephony resume handler",
        lambda: (
            "Handler 'register.<locals>.provision_telephony' succeeded"
            in cluster.kubectl("-n", platform, "logs", "-l", selector, "--tail=-1")
        ),
        timeout=120,
        interval=2,
    )
    trunks_after, rules_after = asyncio.run(livekit_objects(livekit, first))
    assert [t.sip_trunk_id for t in trunks_after] == [trunks[0].sip_trunk_id]
    assert [r.sip_dispatch_rule_id for r in rules_after] == [rules[0].sip_dispatch_rule_id]
    cluster.kubectl("-n", first, "delete", "va", AGENT, "--wait=true", timeout=120)
    assert asyncio.run(livekit_objects(livekit, first)) == ([], [])
