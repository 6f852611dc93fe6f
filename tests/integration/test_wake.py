"""Waking a fleet scaled to zero (issue 12 item 3), with the real operator (its own process) on
a real control plane, a real livekit-server and livekit-sip, and the real runtime.

The control plane has no node, so this test plays the kubelet for the fleet's pods: it keeps
a Node of its own (tainted NoSchedule, so the scheduler places nothing there; its Ready
heartbeat renewed) and binds each worker pod to it (else the scheduler would call the pod
unschedulable, and the operator would turn its callers away at once); it starts
`python -m voicefleet_runtime start` on this host with the pod's own runtime config (read from
the rendered ConfigMap), gives the pod the address 127.0.0.1 and marks it Ready once the
worker's GET /ready answers 200; when the pod is deleted it sends the worker SIGTERM and removes
the pod, as the kubelet would.

- A VoiceAgent with minReplicas 0 sleeps: no replicas, WorkersAvailable says it is asleep and
  wakes on a call, the operator's standby is registered under its dispatch name.
- A WebRTC caller (token dispatch) wakes it: the standby takes the job, the Deployment goes to
  one replica at once, the worker starts and registers, the operator hands the call over
  (CreateDispatch), and the caller hears the agent's greeting. (A phone call waking it, ringing
  until the agent answers, and the fleet going back to sleep: tests/e2e/test_scale_from_zero.py
  with real pods; a phone call answered by the desk's holding message: test_desk.py.)
- A fleet whose worker never starts: after VOICEFLEET_WAKE_TIMEOUT_SECONDS the WebRTC caller
  gets the voicefleet.overflow=wake_timeout attribute and the phone caller 486 Busy Here.

Measured (printed and attached to the report): dispatch -> agent's first audio from zero
workers.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes import client as k8s
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import render
from voicefleet_operator.kube import Kube, KubeError, client_configuration
from voicefleet_testkit import sipcall
from voicefleet_testkit.net import free_port
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer, openai_pipeline
from voicefleet_testkit.waiting import wait_for, wait_until

from tests.integration.test_operator import (
    _create_namespace,
    _create_secret,
    cluster,  # noqa: F401  (fixture)
    condition,
    get_agent,
    settings_for,
    stop_cleanly,
    wait_condition,
    wait_event,
)
from tests.integration.test_overflow import final_response
from tests.integration.test_runtime_worker import RuntimeWorker
from tests.integration.test_telephony_operator import lease_holder

pytestmark = pytest.mark.integration

AGENT = "sleeper"
GREETING = "Hello, you woke me up. How can I help?"
OVERFLOW_ATTRIBUTE = "voicefleet.overflow"
WAKE_TIMEOUT_SECONDS = 150.0


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def namespaces(cluster: ClusterHandle, livekit: LiveKitEndpoint) -> Iterator[tuple[str, str]]:  # noqa: F811
    """(platform with the real LiveKit key, tenant with the provider keys)."""
    platform = _create_namespace(cluster, "vf-wake-platform")
    _create_secret(
        cluster,
        platform,
        "voicefleet-livekit",
        {"LIVEKIT_API_KEY": livekit.api_key, "LIVEKIT_API_SECRET": livekit.api_secret},
    )
    tenant = _create_namespace(cluster, "wake")
    _create_secret(cluster, tenant, "provider-keys", {"OPENAI_API_KEY": "sk-wake"})
    yield platform, tenant
    core = k8s.CoreV1Api(cluster.api_client)
    for namespace in (tenant, platform):
        with contextlib.suppress(k8s.ApiException):
            core.delete_namespace(namespace)


def start_operator(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    namespaces: tuple[str, str],
    log: Path,
    wake_timeout_seconds: float,
) -> OperatorProcess:
    platform, tenant = namespaces
    settings = settings_for(
        platform,
        (tenant,),
        livekit_url=livekit.url,
        wake_timeout_seconds=wake_timeout_seconds,
    )
    return OperatorProcess(settings, cluster.kubeconfig, log).start()


@pytest_asyncio.fixture(loop_scope="session")
async def kube(cluster: ClusterHandle) -> AsyncIterator[Kube]:  # noqa: F811
    client = Kube(client_configuration(str(cluster.kubeconfig)))
    yield client
    await client.close()


def sleeper_spec(providers_url: str, number: str, health: int, metrics: int) -> dict[str, Any]:
    return {
        "agents": [{"name": "front", "instructions": "You answer calls.", "greeting": GREETING}],
        "entry": "front",
        "pipeline": openai_pipeline(providers_url),
        "secretRefs": [{"name": "provider-keys"}],
        "telephony": {"numbers": [number], "inbound": {"allowedAddresses": ["127.0.0.1"]}},
        "worker": {
            "jobsPerWorker": 2,
            "idleProcesses": 1,
            "drainTimeoutSeconds": 30,
            "healthPort": health,
            "metricsPort": metrics,
        },
        "scaling": {
            "minReplicas": 0,
            "maxReplicas": 1,
            "spareJobs": 0,
            "scaleDownDelaySeconds": 3,
        },
    }


def create_sleeper(cluster: ClusterHandle, namespace: str, spec: dict[str, Any]) -> None:  # noqa: F811
    k8s.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
        "voicefleet.dev",
        "v1alpha1",
        namespace,
        "voiceagents",
        {
            "apiVersion": "voicefleet.dev/v1alpha1",
            "kind": "VoiceAgent",
            "metadata": {"name": AGENT},
            "spec": spec,
        },
    )


def fresh_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


# --- the kubelet's part ---------------------------------------------------------------------


@dataclass
class FakeKubelet:
    """Runs the fleet's pods as runtime processes on this host (see the module doc)."""

    kube: Kube
    livekit: LiveKitEndpoint
    workdir: Path
    tenant: str
    start_workers: bool = True
    workers: dict[str, RuntimeWorker] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    """Pods whose worker was started, in order."""
    stopped: set[str] = field(default_factory=set)
    node: str = field(default_factory=lambda: f"wake-fake-kubelet-{secrets.token_hex(3)}")
    heartbeat_at: float = -1e9

    async def workers_namespace(self) -> str:
        return render.worker_namespace(self.tenant)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # API hiccups: the next round retries
                await self._keep_node()
                await self._sync()
            await asyncio.sleep(0.1)

    async def _keep_node(self) -> None:
        """Register the Node (tainted: nothing else is scheduled there) and renew its Ready
        heartbeat every 10 s (the node controller evicts from a node silent for 40 s)."""
        if time.monotonic() - self.heartbeat_at < 10:
            return
        if self.heartbeat_at < 0:
            await self._remove_dead_nodes()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node},
            "spec": {"taints": [{"key": "voicefleet.dev/fake-kubelet", "effect": "NoSchedule"}]},
        }
        try:
            await self.kube.request("POST", "/api/v1/nodes", body=node)
        except KubeError as error:
            if error.status != 409:
                raise
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the wake test's fake kubelet",
            "lastHeartbeatTime": now,
        }
        await self.kube.request(
            "PATCH",
            f"/api/v1/nodes/{self.node}/status",
            body={"status": {"conditions": [ready]}},
            content_type="application/strategic-merge-patch+json",
        )
        self.heartbeat_at = time.monotonic()

    async def _remove_dead_nodes(self) -> None:
        """Nodes of fake kubelets that died without cleaning up (silent for over a minute):
        the cluster's other tests expect only its real node."""
        listed = await self.kube.request("GET", "/api/v1/nodes")
        for node in listed.get("items", []):
            name = node["metadata"]["name"]
            if not name.startswith("wake-fake-kubelet-") or name == self.node:
                continue
            beats = [
                c.get("lastHeartbeatTime", "")
                for c in (node.get("status") or {}).get("conditions") or []
            ]
            last = max(beats, default="") or node["metadata"]["creationTimestamp"]
            silent = time.time() - calendar.timegm(time.strptime(last, "%Y-%m-%dT%H:%M:%SZ"))
            if silent > 60:
                with contextlib.suppress(KubeError):
                    await self.kube.request("DELETE", f"/api/v1/nodes/{name}")

    async def _sync(self) -> None:
        namespace = await self.workers_namespace()
        selector = ",".join(f"{k}={v}" for k, v in render.selector_labels(AGENT).items())
        pods = await self.kube.list("Pod", namespace, selector)
        live = set()
        for pod in pods:
            name = pod["metadata"]["name"]
            if pod["metadata"].get("deletionTimestamp"):
                if pod["spec"].get("nodeName") == self.node:
                    running = self.workers.get(name)
                    if running is not None and name not in self.stopped:
                        self.stopped.add(name)
                        await running.stop()
                    await self._remove(namespace, name)
                continue
            live.add(name)
            if not pod["spec"].get("nodeName"):
                binding = {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                }
                path = f"/api/v1/namespaces/{namespace}/pods/{name}/binding"
                await self.kube.request("POST", path, body=binding)
            if name not in self.workers and self.start_workers:
                config_map = await self.kube.get(
                    "ConfigMap", namespace, render.ChildNames.of(AGENT).config_map
                )
                assert config_map is not None
                config = yaml.safe_load(config_map["data"][render.CONFIG_KEY])
                worker = RuntimeWorker(self.livekit, config, self.workdir / name)
                worker.start()
                self.workers[name] = worker
                self.started.append(name)
                await self._set_status(namespace, name, ready=False)
            running = self.workers.get(name)
            if running is not None and name not in self.stopped:
                code, _ = await asyncio.to_thread(running.readiness)
                ready = code == 200
                conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
                if (conditions.get("Ready") == "True") != ready:
                    await self._set_status(namespace, name, ready=ready)
        for name, worker in self.workers.items():
            if name not in live and name not in self.stopped:
                self.stopped.add(name)
                await worker.stop()

    async def _set_status(self, namespace: str, name: str, *, ready: bool) -> None:
        value = "True" if ready else "False"
        await self.kube.merge_patch(
            "Pod",
            namespace,
            name,
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}],
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": value},
                        {"type": "ContainersReady", "status": value},
                    ],
                }
            },
            subresource="status",
        )

    async def _remove(self, namespace: str, name: str) -> None:
        """The kubelet's part of a pod's deletion: remove it once its containers stopped."""
        with contextlib.suppress(KubeError):
            await self.kube.request(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0},
            )

    async def close(self) -> None:
        for name, worker in self.workers.items():
            if name not in self.stopped:
                await worker.stop()
        # Its pods go with it (a pod bound to a missing node would wait for the pod GC).
        namespace = await self.workers_namespace()
        with contextlib.suppress(KubeError):
            for pod in await self.kube.list("Pod", namespace):
                if pod["spec"].get("nodeName") == self.node:
                    await self._remove(namespace, pod["metadata"]["name"])
        with contextlib.suppress(KubeError):
            await self.kube.request("DELETE", f"/api/v1/nodes/{self.node}")


@contextlib.asynccontextmanager
async def kubelet(
    kube: Kube, livekit: LiveKitEndpoint, workdir: Path, tenant: str, *, start_workers: bool
) -> AsyncIterator[FakeKubelet]:
    fake = FakeKubelet(kube, livekit, workdir, tenant, start_workers=start_workers)
    task = asyncio.create_task(fake.run())
    try:
        yield fake
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fake.close()


async def deployment_replicas(kube: Kube, kubelet: FakeKubelet) -> int | None:
    deployment = await kube.get("Deployment", await kubelet.workers_namespace(), AGENT)
    return None if deployment is None else int(deployment["spec"].get("replicas", 1))


def operator_log(operator: OperatorProcess) -> str:
    return operator.log.read_text(errors="replace") if operator.log.exists() else ""


def wait_asleep(cluster: ClusterHandle, tenant: str, operator: OperatorProcess) -> dict[str, Any]:  # noqa: F811
    wait_condition(cluster, tenant, AGENT, "Reconciled", "True", timeout=60)
    agent = wait_condition(cluster, tenant, AGENT, "Ready", "True", timeout=60)
    wait_for(
        "the operator's standby registered under the dispatch name",
        lambda: f"standby {tenant}.{AGENT}: registered" in operator_log(operator),
        timeout=30,
    )
    workers = condition(agent, "WorkersAvailable")
    assert workers is not None and workers["reason"] == "ScaledToZero", workers
    assert "asleep" in workers["message"] and "wakes" in workers["message"], workers
    return agent


def _asleep_now(cluster: ClusterHandle, tenant: str) -> bool:  # noqa: F811
    """Ready says the fleet is asleep and wakes on a call (not that workers take calls)."""
    ready = condition(get_agent(cluster, tenant, AGENT), "Ready") or {}
    return (
        ready.get("status") == "True"
        and ready.get("reason") == "Asleep"
        and "wakes" in str(ready.get("message"))
    )


# --- the tests ------------------------------------------------------------------------------


async def test_a_call_wakes_a_fleet_at_zero_and_reaches_the_agent(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],
    kube: Kube,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    _, tenant = namespaces
    number = fresh_number()
    spec = sleeper_spec(providers.base_url, number, free_port(), free_port())
    # A generous bound: a worker starts in seconds on an idle machine, in a minute on this
    # loaded 2-core one (the phone keeps ringing: the trunk rings 5 s longer than this).
    operator = start_operator(
        cluster, livekit, namespaces, tmp_path / "operator.log", WAKE_TIMEOUT_SECONDS
    )
    try:
        create_sleeper(cluster, tenant, spec)
        async with kubelet(kube, livekit, tmp_path, tenant, start_workers=True) as fake:
            await asyncio.to_thread(wait_asleep, cluster, tenant, operator)
            await asyncio.to_thread(
                wait_for, "Ready=True/Asleep", lambda: _asleep_now(cluster, tenant), 30
            )
            assert await deployment_replicas(kube, fake) == 0
            assert not fake.started

            # --- a WebRTC caller wakes it ----------------------------------------------------
            room = f"wake-{secrets.token_hex(4)}"
            token = participant_token(
                livekit.api_key,
                livekit.api_secret,
                room,
                "caller",
                dispatch_agent=f"{tenant}.{AGENT}",
            )
            async with TestParticipant(livekit.url, token) as caller:
                dispatched_at = time.monotonic()  # joining with the token dispatches the agent
                agent = await caller.wait_for_participant(
                    agent=True, timeout_s=WAKE_TIMEOUT_SECONDS
                )
                assert OVERFLOW_ATTRIBUTE not in agent.attributes, agent.attributes
                heard_at = await caller.wait_for_audio(agent.identity, timeout_s=30)
            webrtc_s = heard_at - dispatched_at
            assert len(fake.started) == 1, fake.started
            log = operator_log(operator)
            assert f"room {room} handed over" in log, log[-3000:]

        record_property("dispatch_to_agent_first_audio_from_zero_s", round(webrtc_s, 2))
        print(f"wake from zero: WebRTC dispatch -> agent's first audio {webrtc_s:.2f}s")
    finally:
        await _delete_agent_and_stop(cluster, tenant, operator)


async def _delete_agent_and_stop(
    cluster: ClusterHandle,  # noqa: F811
    tenant: str,
    operator: OperatorProcess,
) -> None:
    """Delete the test's VoiceAgent, wait until its finalizer is done, stop the operator (also
    when the wait fails: a failed test must not leave its operator running)."""
    try:
        with contextlib.suppress(k8s.ApiException):
            k8s.CustomObjectsApi(cluster.api_client).delete_namespaced_custom_object(
                "voicefleet.dev", "v1alpha1", tenant, "voiceagents", AGENT
            )
        await asyncio.to_thread(
            wait_for, "the VoiceAgent gone", lambda: not _exists(cluster, tenant), 60
        )
    finally:
        stop_cleanly(operator)


def _exists(cluster: ClusterHandle, tenant: str) -> bool:  # noqa: F811
    try:
        get_agent(cluster, tenant, AGENT)
    except k8s.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


async def test_a_fleet_that_cannot_wake_turns_its_callers_away(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],
    kube: Kube,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """No worker ever starts (the pod never runs): after the wake timeout the WebRTC caller gets
    the overflow attribute, the phone caller 486 Busy Here; never endless silence or ringing.
    This operator has no desk: the spec's holdMessage cannot be said, the callers get the same
    treatment, and a Warning Event names the field."""
    _, tenant = namespaces
    number = fresh_number()
    spec = sleeper_spec(providers.base_url, number, free_port(), free_port())
    spec["overflow"] = {"holdMessage": "One moment please."}
    wake_timeout = 5.0
    operator = start_operator(cluster, livekit, namespaces, tmp_path / "operator.log", wake_timeout)
    try:
        create_sleeper(cluster, tenant, spec)
        async with kubelet(kube, livekit, tmp_path, tenant, start_workers=False):
            await asyncio.to_thread(wait_asleep, cluster, tenant, operator)
            warning = await asyncio.to_thread(
                wait_event, cluster, tenant, AGENT, "PlatformFeatureMissing"
            )
            assert warning.type == "Warning", warning
            assert warning.message.startswith(
                "spec.overflow.holdMessage: this platform runs no desk"
            )
            room = f"nowake-{secrets.token_hex(4)}"
            token = participant_token(
                livekit.api_key,
                livekit.api_secret,
                room,
                "caller",
                dispatch_agent=f"{tenant}.{AGENT}",
            )
            async with TestParticipant(livekit.url, token) as caller:
                joined_at = time.monotonic()

                def told() -> bool:
                    attributes = caller.room.local_participant.attributes
                    return attributes.get(OVERFLOW_ATTRIBUTE) == "wake_timeout"

                await wait_until("the caller told that the fleet cannot wake", told, 60)
                told_s = time.monotonic() - joined_at
            # It tried: one replica wanted at once (the pod never runs here).
            assert "0 -> 1 replicas" in operator_log(operator)

            result = await asyncio.to_thread(
                sipcall.place_call,
                "call.xml",
                number,
                tmp_path / "sip-call",
                talk_seconds=3,
                answer_timeout=60,
            )
            final = final_response(result)
            assert final is not None and " 486 " in final.first_line, result.describe()
            assert result.answered_at is None, result.describe()
            assert result.invite_at is not None
            rejected_s = final.at - result.invite_at
            log = operator_log(operator)
            assert "no worker registered within" in log, log[-3000:]
        record_property("webrtc_wake_timeout_told_s", round(told_s, 2))
        record_property("invite_to_486_wake_timeout_s", round(rejected_s, 2))
        print(
            f"wake timeout {wake_timeout:g}s: WebRTC caller told after {told_s:.2f}s; "
            f"INVITE -> 486 {rejected_s:.2f}s"
        )
    finally:
        await _delete_agent_and_stop(cluster, tenant, operator)


async def test_callers_held_by_a_leader_that_dies_are_woken_by_the_next_one(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],
    kube: Kube,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Two operator replicas with leader election. The leader's standby holds a WebRTC caller
    and a phone caller of a sleeping fleet (its log says so) and is SIGKILLed; livekit-server
    forgets both (their jobs ended when the standby took them). The next leader finds the two
    rooms (a caller, no agent, a dispatch to the fleet that no agent took), holds them, wakes
    the fleet and hands them over: both hear the agent."""
    platform, tenant = namespaces
    number = fresh_number()
    spec = sleeper_spec(providers.base_url, number, free_port(), free_port())
    spec["worker"]["jobsPerWorker"] = 4  # two agent calls: floor(4 x 0.7)
    lease = f"vf-wake-election-{secrets.token_hex(3)}"
    settings = settings_for(
        platform,
        (tenant,),
        livekit_url=livekit.url,
        wake_timeout_seconds=WAKE_TIMEOUT_SECONDS,
    )
    replicas = {
        identity: OperatorProcess(
            settings,
            cluster.kubeconfig,
            tmp_path / f"{identity}.log",
            extra_env={
                "POD_NAME": identity,
                "POD_NAMESPACE": platform,
                "VOICEFLEET_LEADER_ELECTION": "true",
                "VOICEFLEET_LEASE_NAME": lease,
            },
        ).launch()
        for identity in ("replica-a", "replica-b")
    }
    try:
        leader = await asyncio.to_thread(
            wait_for, "a leader", lambda: lease_holder(cluster, platform, lease), 60
        )
        (successor,) = set(replicas) - {leader}
        create_sleeper(cluster, tenant, spec)
        async with kubelet(kube, livekit, tmp_path, tenant, start_workers=False) as fake:
            await asyncio.to_thread(wait_asleep, cluster, tenant, replicas[leader])
            wait_condition(cluster, tenant, AGENT, "TelephonyReady", "True", timeout=60)
            holding = "holding the caller of room"
            room = f"orphan-{secrets.token_hex(4)}"
            token = participant_token(
                livekit.api_key,
                livekit.api_secret,
                room,
                "caller",
                dispatch_agent=f"{tenant}.{AGENT}",
            )
            async with TestParticipant(livekit.url, token) as caller:
                await wait_until(
                    "the leader holding the WebRTC caller",
                    lambda: f"{holding} {room}" in operator_log(replicas[leader]),
                    30,
                )
                phone = asyncio.create_task(
                    asyncio.to_thread(
                        sipcall.place_call,
                        "call.xml",
                        number,
                        tmp_path / "sip-call",
                        talk_seconds=40,
                        answer_timeout=WAKE_TIMEOUT_SECONDS + 10,
                        timeout=WAKE_TIMEOUT_SECONDS + 60,
                    )
                )
                await wait_until(
                    "the leader holding the phone caller too",
                    lambda: operator_log(replicas[leader]).count(holding) >= 2,
                    60,
                )
                # The kill point: both callers held by this leader, no worker registered.
                assert not fake.started
                replicas[leader].kill()
                killed_at = time.monotonic()
                assert await asyncio.to_thread(replicas[leader].wait, 10) == -9
                fake.start_workers = True  # the pod may run now; only a leader can hand over
                agent = await caller.wait_for_participant(
                    agent=True, timeout_s=WAKE_TIMEOUT_SECONDS
                )
                answered_s = time.monotonic() - killed_at
                assert OVERFLOW_ATTRIBUTE not in agent.attributes, agent.attributes
                heard_at = await caller.wait_for_audio(agent.identity, timeout_s=30)
                webrtc_s = heard_at - killed_at
            result = await phone
            final = final_response(result)
            assert final is not None and final.first_line.startswith("SIP/2.0 200"), (
                result.describe()
            )
            assert result.capture.voiced_seconds() > 1.0, result.describe()
            assert result.answered_at is not None and result.invite_at is not None
            log = operator_log(replicas[successor])
            assert log.count("a caller no operator holds") == 2, log[-4000:]
            assert f"room {room} handed over" in log, log[-4000:]
            assert lease_holder(cluster, platform, lease) == successor
        record_property("leader_kill_to_webrtc_agent_joined_s", round(answered_s, 2))
        record_property("leader_kill_to_webrtc_agent_first_audio_s", round(webrtc_s, 2))
        print(
            f"leader SIGKILLed holding two callers: WebRTC agent joined {answered_s:.2f}s, "
            f"first audio {webrtc_s:.2f}s after the kill; the phone call was answered "
            f"{result.answered_at - result.invite_at:.2f}s after its INVITE"
        )
    finally:
        # One operator without election removes the finalizer (on this loaded machine a
        # leader may lose its Lease at any time and exit, leaving none).
        for process in replicas.values():
            process.kill()
        cleaner = start_operator(
            cluster, livekit, namespaces, tmp_path / "cleanup.log", WAKE_TIMEOUT_SECONDS
        )
        await _delete_agent_and_stop(cluster, tenant, cleaner)
