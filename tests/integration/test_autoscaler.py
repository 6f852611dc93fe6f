"""The autoscaler against a real kube-apiserver and kube-controller-manager.

The worker Deployment's pods are real API objects, created and deleted by the real ReplicaSet
controller; this test plays the kubelet's part only (it gives each pod an address and marks it
Ready, keeping the pods off any node) and serves each pod's report (GET /report) over real
HTTP, the runtime's own WorkerReport. So what is checked is the operator's side end to end:
reading the load, the replicas it sets (server-side apply next to the reconcile's), the scale-
down window kept on the Deployment across an operator restart, the pod-deletion-cost it keeps,
and that the ReplicaSet controller then removes the idle pods, not the busy ones.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from kubernetes import client as k8s
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import handlers, render
from voicefleet_operator.api import parse_spec
from voicefleet_operator.kube import Kube, client_configuration
from voicefleet_operator.scaling import DELETION_COST_ANNOTATION, SCALE_DOWN_ANNOTATION
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime.admission import REPORT_PATH, WorkerReport
from voicefleet_testkit import conditions

pytestmark = pytest.mark.integration

METRICS_PORT = 19181
DELAY_SECONDS = 3
CRD = str(Path(__file__).resolve().parents[2] / "crds" / "voiceagents.voicefleet.dev.yaml")
# Addresses the fake kubelet hands out; the workers' HTTP servers listen on them.
POD_ADDRESSES = [f"127.0.0.{n}" for n in range(30, 60)]

SPEC: dict[str, Any] = {
    "agents": [{"name": "front", "instructions": "Help."}],
    "entry": "front",
    "pipeline": {
        "stt": {"provider": "openai", "model": "whisper-1"},
        "llm": {"provider": "openai"},
        "tts": {"provider": "openai"},
    },
    "secretRefs": [{"name": "provider-keys"}],
    "worker": {"jobsPerWorker": 2, "loadThreshold": 0.7, "metricsPort": METRICS_PORT},
    "scaling": {
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetLoad": 0.7,
        "spareJobs": 1,
        "scaleDownDelaySeconds": DELAY_SECONDS,
    },
}


@pytest.fixture(scope="module")
def cluster(control_plane: ClusterHandle) -> ClusterHandle:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", CRD)
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/voiceagents.voicefleet.dev"
    )
    return control_plane


@pytest.fixture
def namespace(cluster: ClusterHandle) -> Iterator[str]:
    """The tenant namespace (the VoiceAgent's); its worker namespace (the Deployment's and the
    pods') is made with it."""
    name = f"autoscaler-{secrets.token_hex(3)}"
    core = k8s.CoreV1Api(cluster.api_client)
    for namespace in (name, render.worker_namespace(name)):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    yield name
    for namespace in (name, render.worker_namespace(name)):
        core.delete_namespace(namespace)


@pytest_asyncio.fixture(loop_scope="session")
async def kube(cluster: ClusterHandle) -> AsyncIterator[Kube]:
    client = Kube(client_configuration(str(cluster.kubeconfig)))
    yield client
    await client.close()


# --- the fleet: pods given addresses, workers answering /worker ------------------------------


@dataclass
class FakeFleet:
    """Plays the kubelet (address + Ready) and each worker's report (GET /report)."""

    kube: Kube
    namespace: str
    jobs: dict[str, int] = field(default_factory=dict)
    """Active jobs per pod name; a pod missing here reports 0."""
    silent: set[str] = field(default_factory=set)
    """Pods whose worker does not answer (hung or crashed)."""
    jobs_per_worker: dict[str, int] = field(default_factory=dict)
    """jobsPerWorker a pod reports (a pod of an older config); missing: the spec's 2."""
    addresses: dict[str, str] = field(default_factory=dict)
    runners: dict[str, web.AppRunner] = field(default_factory=dict)

    async def sync(self) -> list[str]:
        """Serve every new pod of the Deployment; returns the live (not terminating) pods."""
        selector = ",".join(f"{k}={v}" for k, v in render.selector_labels("fleet").items())
        live = []
        for pod in await self.kube.list("Pod", self.namespace, selector):
            name = pod["metadata"]["name"]
            if pod["metadata"].get("deletionTimestamp"):
                continue
            live.append(name)
            if name not in self.addresses:
                address = POD_ADDRESSES[len(self.addresses)]
                self.addresses[name] = address
                await self._serve(name, address)
                await self.kube.merge_patch(
                    "Pod",
                    self.namespace,
                    name,
                    {
                        "status": {
                            "phase": "Running",
                            "podIP": address,
                            "podIPs": [{"ip": address}],
                            "conditions": [
                                {"type": "Ready", "status": "True"},
                                {"type": "ContainersReady", "status": "True"},
                            ],
                        }
                    },
                    subresource="status",
                )
        return sorted(live)

    async def _serve(self, pod: str, address: str) -> None:
        async def report(_: web.Request) -> web.Response:
            if pod in self.silent:
                await asyncio.sleep(30)
            slots = self.jobs_per_worker.get(pod, 2)
            capacity = int(slots * 0.7)
            body = WorkerReport(
                agent_jobs=self.jobs.get(pod, 0),
                pending_agent_jobs=0,
                overflow_jobs=0,
                budget=capacity,
                capacity=capacity,
                jobs_per_worker=slots,
                load_threshold=0.7,
                limit_reason="capacity",
                overflow_slots=4,
                draining=False,
                registered=True,
                config_hash="c0ffee",
            )
            return web.json_response(body.model_dump(mode="json", by_alias=True))

        app = web.Application()
        app.router.add_get(REPORT_PATH, report)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, address, METRICS_PORT).start()
        self.runners[pod] = runner

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def fleet(kube: Kube, namespace: str) -> AsyncIterator[FakeFleet]:
    running = FakeFleet(kube, render.worker_namespace(namespace))
    yield running
    await running.close()


# --- helpers --------------------------------------------------------------------------------


def settings() -> PlatformSettings:
    return PlatformSettings(
        livekit_url="ws://127.0.0.1:7880",
        livekit_secret_namespace="unused",
        runtime_image="localhost/voicefleet/runtime:dev",
    )


async def create_voiceagent(kube: Kube, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": "fleet", "namespace": namespace},
        "spec": spec,
    }
    return await kube.request(
        "POST", f"/apis/voicefleet.dev/v1alpha1/namespaces/{namespace}/voiceagents", body=body
    )


async def apply_deployment_as_the_reconcile(kube: Kube, agent: dict[str, Any]) -> dict[str, Any]:
    """What the reconcile applies (render + replicas_for + server-side apply), kept off nodes."""
    ref = render.VoiceAgentRef.from_body(agent)
    spec = parse_spec(agent["spec"])
    current = await kube.get("Deployment", ref.worker_namespace, ref.name)
    await kube.apply(render.render_service_account(ref))
    deployment = render.render_deployment(
        ref,
        spec,
        settings(),
        config_hash="c0ffee",
        secrets_hash="5ec",
        replicas=handlers.replicas_for(spec, current),
    )
    # No kubelet may start these pods: this test plays the kubelet.
    deployment["spec"]["template"]["spec"]["nodeSelector"] = {"voicefleet.dev/no-node": "true"}
    return await kube.apply(deployment)


async def replicas(kube: Kube, namespace: str) -> int:
    deployment = await kube.get("Deployment", render.worker_namespace(namespace), "fleet")
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


async def status(kube: Kube, namespace: str) -> dict[str, Any]:
    agent = await kube.get("VoiceAgent", namespace, "fleet")
    assert agent is not None
    return dict(agent.get("status") or {})


async def costs(kube: Kube, namespace: str) -> dict[str, str | None]:
    selector = ",".join(f"{k}={v}" for k, v in render.selector_labels("fleet").items())
    pods = await kube.list("Pod", render.worker_namespace(namespace), selector)
    return {
        p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(
            DELETION_COST_ANNOTATION
        )
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
    }


async def settle(fleet: FakeFleet, count: int, within_seconds: float = 60) -> list[str]:
    """Wait until the ReplicaSet has exactly `count` live pods, all served."""
    deadline = time.monotonic() + within_seconds
    while True:
        live = await fleet.sync()
        if len(live) == count:
            return live
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} live pods, have {live}")
        await asyncio.sleep(0.3)


def condition(agent_status: dict[str, Any], type: str) -> dict[str, Any]:
    """Condition `type` of a VoiceAgent's status (read alone here); it must exist."""
    found = conditions.condition({"status": agent_status}, type)
    assert found, agent_status
    return found


# --- the test -------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_autoscaler_scales_on_load_and_removes_idle_pods_first(
    cluster: ClusterHandle, kube: Kube, namespace: str, fleet: FakeFleet
) -> None:
    agent = await create_voiceagent(kube, namespace, SPEC)
    await apply_deployment_as_the_reconcile(kube, agent)
    ctx = handlers.OperatorContext(settings=settings(), kube=kube)

    async def evaluate() -> None:
        await fleet.sync()
        await handlers.autoscale(ctx, namespace, "fleet")

    # At rest: one worker (1 spare job / 1.4 planned per worker), its cost stamped.
    [first] = await settle(fleet, 1)
    await evaluate()
    assert await replicas(kube, namespace) == 1
    assert await costs(kube, namespace) == {first: "0"}
    at_rest = await status(kube, namespace)
    assert (at_rest["activeJobs"], at_rest["load"], at_rest["desiredReplicas"]) == (0, 0.0, 1)
    assert condition(at_rest, "ScalingActive")["status"] == "True"

    # A busy worker: 2 jobs + 1 spare need 3 workers, at once.
    fleet.jobs[first] = 2
    await evaluate()
    assert await replicas(kube, namespace) == 3
    busy = await status(kube, namespace)
    assert (busy["activeJobs"], busy["load"], busy["desiredReplicas"]) == (2, 1.0, 3)
    assert condition(busy, "ScalingActive")["reason"] == "ScaleUp"
    pods = await settle(fleet, 3)
    second, third = [p for p in pods if p != first]

    # The reconcile re-applies the Deployment (it keeps the current replicas): no fight.
    await apply_deployment_as_the_reconcile(kube, agent)
    assert await replicas(kube, namespace) == 3

    # Costs follow the jobs.
    fleet.jobs.update({first: 2, second: 1, third: 0})
    await evaluate()
    assert await costs(kube, namespace) == {first: "200", second: "100", third: "0"}
    assert (await status(kube, namespace))["load"] == 0.5  # 3 calls / (3 pods x 2)

    # Each pod is judged by its own report: one still runs a config of 4 jobs per worker.
    fleet.jobs_per_worker[first] = 4
    await evaluate()
    assert (await status(kube, namespace))["load"] == 0.375  # 3 / (4 + 2 + 2), not 3 / 6
    del fleet.jobs_per_worker[first]

    # An unreachable worker counts as full: 2 + 1 + 2 (third silent) + 1 spare -> 5 -> max 4.
    fleet.silent.add(third)
    await evaluate()
    assert await replicas(kube, namespace) == 4
    unreachable = await status(kube, namespace)
    assert (
        "1 unreachable worker(s) counted as full"
        in (condition(unreachable, "ScalingActive")["message"])
    )
    assert (await costs(kube, namespace))[third] == "200"
    fleet.silent.discard(third)
    pods = await settle(fleet, 4)
    fourth = next(p for p in pods if p not in (first, second, third))

    # Demand falls (one job left on `second`): 1 + 1 spare -> 2 workers, after the delay only.
    fleet.jobs.update({first: 0, second: 1, third: 0, fourth: 0})
    await evaluate()
    assert await replicas(kube, namespace) == 4
    deployment = await kube.get("Deployment", render.worker_namespace(namespace), "fleet")
    assert deployment is not None
    window = deployment["metadata"]["annotations"][SCALE_DOWN_ANNOTATION]
    pending = await status(kube, namespace)
    assert condition(pending, "ScalingActive")["reason"] == "ScaleDownPending"
    assert await costs(kube, namespace) == {first: "0", second: "100", third: "0", fourth: "0"}

    # An operator restart (a new context) keeps the window rather than starting it again.
    ctx = handlers.OperatorContext(settings=settings(), kube=kube)
    await evaluate()
    deployment = await kube.get("Deployment", render.worker_namespace(namespace), "fleet")
    assert deployment is not None
    assert deployment["metadata"]["annotations"][SCALE_DOWN_ANNOTATION] == window

    await asyncio.sleep(DELAY_SECONDS + 0.5)
    await evaluate()
    assert await replicas(kube, namespace) == 2
    survivors = await settle(fleet, 2)
    # The ReplicaSet removed idle pods: the one with a call is still there.
    assert second in survivors, survivors
    deployment = await kube.get("Deployment", render.worker_namespace(namespace), "fleet")
    assert deployment is not None
    assert SCALE_DOWN_ANNOTATION not in (deployment["metadata"].get("annotations") or {})

    # A pin wins at once, both ways, and says so.
    pinned_spec = {**SPEC, "scaling": {**SPEC["scaling"], "replicas": 3}}
    await kube.merge_patch("VoiceAgent", namespace, "fleet", {"spec": pinned_spec})
    await evaluate()
    assert await replicas(kube, namespace) == 3
    pinned = await status(kube, namespace)
    scaling_active = condition(pinned, "ScalingActive")
    assert (scaling_active["status"], scaling_active["reason"]) == ("False", "Pinned")
    await settle(fleet, 3)
