"""Dashboards and alerts against the real Prometheus of the local stack.

`helm install` of the chart (operator pod with scrape annotations, dashboards enabled) serving one
tenant namespace, whose VoiceAgents' worker pods carry the operator's scrape annotations; the
local Prometheus discovers both through the cluster and loads the chart's PrometheusRule groups
(rendered with short `for:` durations). Then, in that tenant:

  quality  a healthy agent taking a few calls with several turns each (turn latency, usage),
           its LLM replies held back SLOW_REPLY_S, so its turns are slow;
  full     a deliberately broken setup: 1 job per worker, at most 1 worker, 5 spare jobs wanted,
           2 idle processes; three dispatches arrive at once (one job takes the slot and holds
           it; with two idle processes livekit-agents lets an overlapping request through to
           the worker's capacity gate, which refuses it), so the agent is at capacity;
  broken   a VoiceAgent whose ConfigMap name is taken by a foreign object (reconcile error) and
           whose SIP auth Secret does not exist (telephony provisioning error);
  crashing a VoiceAgent whose tenant set a memory limit no worker can start in (64Mi): its
           container is OOM-killed at start-up, again and again (CrashLoopBackOff).

Every dashboard panel's query must then return at least one series (a real number for the
quantiles), the capacity alert must fire for `full` and not for `quality`, the reconcile and
telephony alerts must fire for `broken`, the turn latency alert for `quality`, the dispatch
rejections alert for `full` (a second burst beyond its overflow slots is refused), and the
crash-loop alert for the `crashing` worker pod (which has no capacity either). The plot
command draws the run to <state>/logs/observability-e2e.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from livekit import api
from voicefleet_localdev import chart, paths, plot
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.prometheus import PrometheusClient
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_operator.render import ChildNames, dispatch_name
from voicefleet_runtime.admission import REPORT_PATH, WorkerReport
from voicefleet_testkit import observability
from voicefleet_testkit.conditions import condition
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import (
    DEFAULT_TRANSCRIPT,
    LLMReply,
    ProviderServer,
    openai_pipeline,
)
from voicefleet_testkit.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

RELEASE = "vf-observability"
HEALTH_PORT = 8081
RULES_NAME = "voicefleet-e2e"
# Short `for:` so the test need not wait minutes; the expressions are the chart's own.
RULE_OVERRIDES = (
    "--set", "monitoring.prometheusRule.noSpareCapacity.for=15s",
    "--set", "monitoring.prometheusRule.reconcileErrors.for=15s",
    "--set", "monitoring.prometheusRule.telephonyNotReady.for=15s",
    "--set", "monitoring.prometheusRule.dispatchRejections.for=15s",
    "--set", "monitoring.prometheusRule.turnLatency.for=15s",
    "--set", "monitoring.prometheusRule.workersCrashLooping.for=15s",
)  # fmt: skip
# The quality agent's replies are held back this long (time to first token): its turns are
# slower than the chart's p95 threshold (1.5 s), so VoiceFleetTurnLatencyHigh fires for it.
SLOW_REPLY_S = 2.0
TURNS_PER_CALL = 3
PLOT_FILE = paths.logs_dir() / "observability-e2e.png"
RESULTS_FILE = paths.logs_dir() / "observability-e2e.json"


# --- the stack --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[tuple[str, str]]:
    """(platform namespace, tenant namespace)."""
    suffix = secrets.token_hex(3)
    platform, tenant = f"vf-obs-system-{suffix}", f"obs-{suffix}"
    for namespace in (platform, tenant):
        cluster_with_node.kubectl("create", "namespace", namespace)
    yield platform, tenant
    for namespace in (tenant, platform):
        with contextlib.suppress(AssertionError):
            cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


def _kubectl_json(cluster: ClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def _apply(cluster: ClusterHandle, obj: dict[str, Any]) -> None:
    manifest = paths.state_dir() / f"observability-e2e-{obj['kind']}-{obj['metadata']['name']}.json"
    manifest.write_text(json.dumps(obj))
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifest))
    finally:
        manifest.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: tuple[str, str],
) -> Iterator[str]:
    """The chart installed with dashboards on; the operator serves only the tenant namespace."""
    platform, tenant = namespaces
    # project_images (requested above) has built the images local_values names.
    values = chart.local_values(watch_namespaces=[tenant], livekit=livekit)
    values["monitoring"] = {"dashboards": {"enabled": True}}
    with installed_chart(
        cluster_with_node, RELEASE, platform, values, tenants=[tenant], skip_crds=True
    ):
        yield platform


@pytest.fixture(scope="module")
def alert_rules(prometheus: PrometheusClient) -> Iterator[list[str]]:
    """The chart's PrometheusRule groups, loaded into the local Prometheus."""
    groups = observability.alert_rule_groups(*RULE_OVERRIDES)
    loaded = prometheus.load_rules(RULES_NAME, observability.rule_file_text(groups))
    missing = {g["name"] for g in groups} - set(loaded)
    assert not missing, f"Prometheus did not load rule groups {missing}; it has {loaded}"
    yield loaded
    prometheus.remove_rules(RULES_NAME)


def voiceagent(
    tenant: str, name: str, providers: ProviderServer, *, worker: dict[str, Any],
    scaling: dict[str, Any], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": name, "namespace": tenant},
        "spec": {
            "agents": [
                {
                    "name": "front",
                    "instructions": "You answer calls for the observability test.",
                    "greeting": "Hello, this is the observability test.",
                }
            ],
            "entry": "front",
            "pipeline": openai_pipeline(providers.base_url),
            "secretRefs": [{"name": "provider-keys"}],
            "worker": {"healthPort": HEALTH_PORT, **worker},
            "scaling": scaling,
            **(extra or {}),
        },
    }


def _agent_calls_running(cluster: ClusterHandle, tenant: str, agent: str) -> int:
    """Agent calls the agent's workers report running (GET /report on their metrics port)."""
    pods = _kubectl_json(
        cluster,
        "-n",
        render.worker_namespace(tenant),
        "get",
        "pods",
        "-l",
        f"{render.LABEL_VOICE_AGENT}={agent}",
    )["items"]
    running = 0
    for pod in pods:
        (container,) = (c for c in pod["spec"]["containers"] if c["name"] == "worker")
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        url = f"http://{pod['status']['podIP']}:{port}{REPORT_PATH}"
        with urllib.request.urlopen(url, timeout=5) as response:
            running += WorkerReport.model_validate_json(response.read()).agent_jobs
    return running


def _worker_logs(cluster: ClusterHandle, tenant: str, agent: str) -> str:
    try:
        return cluster.kubectl(
            "-n",
            render.worker_namespace(tenant),
            "logs",
            "--tail=80",
            "--prefix",
            "-l",
            f"voicefleet.dev/voiceagent={agent}",
        )
    except AssertionError as error:
        return str(error)


# --- calls ------------------------------------------------------------------------------------


async def _call(livekit: LiveKitEndpoint, tenant: str, agent: str, index: int) -> TestParticipant:
    room = f"obs-{agent}-{index}-{int(time.time())}"
    token = participant_token(
        livekit.api_key,
        livekit.api_secret,
        room,
        identity=f"caller-{agent}-{index}",
        dispatch_agent=dispatch_name(tenant, agent),
    )
    caller = TestParticipant(livekit.url, token)
    await caller.join()
    return caller


async def _conversation(livekit: LiveKitEndpoint, tenant: str, agent: str, index: int) -> int:
    """One call: the greeting, then TURNS_PER_CALL questions each answered; returns turns."""
    caller = await _call(livekit, tenant, agent, index)
    try:
        await caller.wait_for_participant(agent=True, timeout_s=60)
        greeting = await caller.wait_for_audio(timeout_s=60)
        await caller.wait_for_speech_end(after=greeting - 0.1, timeout_s=60)
        for turn in range(TURNS_PER_CALL):
            phrase = await caller.say(f"Question number {turn + 1}: are you open on Sunday?")
            assert phrase.ended_at is not None
            reply = await caller.wait_for_audio(after=phrase.ended_at, timeout_s=60)
            await caller.wait_for_speech_end(after=reply - 0.1, timeout_s=60)
        return TURNS_PER_CALL
    finally:
        await caller.leave()


# --- the test ---------------------------------------------------------------------------------


def _series_of(prometheus: PrometheusClient, query: observability.PanelQuery) -> list[Any]:
    samples = prometheus.query(query.promql(rate_interval="5m", time_range="1h"))
    if "histogram_quantile" in query.expr:
        # A quantile of buckets that did not grow is NaN: a series, but no answer.
        return [s for s in samples if not math.isnan(s.value)]
    return samples


@pytest.mark.asyncio(loop_scope="session")
async def test_dashboards_show_real_series_and_the_capacity_alert_fires(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    prometheus: PrometheusClient,
    release: str,
    namespaces: tuple[str, str],
    alert_rules: list[str],
    pod_providers: ProviderServer,
) -> None:
    cluster = cluster_with_node
    platform, tenant = namespaces
    started = time.time()
    results: dict[str, Any] = {"tenant": tenant, "platform": platform}

    # Dashboards reached the cluster as ConfigMaps for the Grafana sidecar.
    maps = _kubectl_json(cluster, "-n", platform, "get", "configmaps", "-l", "grafana_dashboard=1")
    assert len(maps["items"]) == len(observability.dashboards())

    _apply(cluster, {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "provider-keys", "namespace": tenant},
        "stringData": {"OPENAI_API_KEY": "sk-local-test-key"},
    })  # fmt: skip
    healthy = voiceagent(
        tenant, "quality", pod_providers,
        worker={"jobsPerWorker": 4, "idleProcesses": 2},
        scaling={"minReplicas": 1, "maxReplicas": 1, "spareJobs": 0},
    )  # fmt: skip
    full = voiceagent(
        tenant, "full", pod_providers,
        worker={"jobsPerWorker": 1, "idleProcesses": 2, "loadThreshold": 0.7},
        scaling={"minReplicas": 1, "maxReplicas": 1, "spareJobs": 5},
    )  # fmt: skip
    # Broken twice over: a foreign ConfigMap holds its child's name, the SIP auth Secret is
    # missing. It never gets workers; the operator reports both.
    number = "+1555" + "".join(str(secrets.randbelow(10)) for _ in range(7))
    broken = voiceagent(
        tenant, "broken", pod_providers,
        worker={"jobsPerWorker": 1}, scaling={"minReplicas": 1, "maxReplicas": 1},
        extra={"telephony": {"numbers": [number],
                             "inbound": {"authSecretRef": {"name": "missing-sip-auth"}}}},
    )  # fmt: skip
    # (In the tenant's worker namespace, where the children go; made ahead of the operator,
    # which adopts it by its tenant label.)
    workers = render.worker_namespace(tenant)
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": workers, "labels": {render.LABEL_TENANT: tenant}},
    })  # fmt: skip
    _apply(cluster, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ChildNames.of("broken").config_map, "namespace": workers},
        "data": {"owner": "someone else"},
    })  # fmt: skip
    # A memory limit no worker starts in: OOM-killed at start-up, over and over.
    crashing = voiceagent(
        tenant, "crashing", pod_providers,
        worker={"jobsPerWorker": 1, "idleProcesses": 0,
                "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
                              "limits": {"memory": "64Mi"}}},
        scaling={"minReplicas": 1, "maxReplicas": 1, "spareJobs": 0},
    )  # fmt: skip
    for agent in (healthy, full, broken, crashing):
        _apply(cluster, agent)
    # Every reply of the quality agent's conversations comes SLOW_REPLY_S late.
    pod_providers.script_llm(
        LLMReply("Yes, we are open on Sunday.", match=DEFAULT_TRANSCRIPT, delay=SLOW_REPLY_S,
                 repeat=True)
    )  # fmt: skip

    def ready(name: str) -> bool:
        return (
            condition(_kubectl_json(cluster, "-n", tenant, "get", "va", name), "Ready") or {}
        ).get("status") == "True"

    # Ready means a worker is registered with LiveKit (the runtime's /ready): calls can go.
    for name in ("quality", "full"):
        try:
            wait_for(f"VoiceAgent {name} to be Ready", partial(ready, name), 400, 3)
        except AssertionError as error:
            status = _kubectl_json(cluster, "-n", tenant, "get", "va", name).get("status")
            pods = cluster.kubectl("-n", workers, "get", "pods", "-o", "wide")
            details = f"status: {json.dumps(status, indent=1)}\n{pods}"
            raise AssertionError(
                f"{error}\n{details}\n{_worker_logs(cluster, tenant, name)}"
            ) from error
    await asyncio.sleep(5)  # its idle job processes warm up

    # Prometheus scrapes the operator pod and every worker pod (annotations, pod discovery).
    operator_targets = await asyncio.to_thread(
        prometheus.wait_for_targets, "kubernetes-pods", {"namespace": platform}, 120
    )
    worker_pods = {
        pod["metadata"]["name"]
        for pod in _kubectl_json(
            cluster,
            "-n",
            workers,
            "get",
            "pods",
            "-l",
            f"app.kubernetes.io/component=worker,{render.LABEL_VOICE_AGENT}!=crashing",
        )["items"]
    }

    def all_workers_scraped() -> set[str] | None:
        prometheus.sync_discovery()
        up = {
            t["labels"].get("pod")
            for t in prometheus.active_targets()
            if t["labels"].get("namespace") == workers and t["health"] == "up"
        }
        return up if worker_pods <= up else None

    wait_for("every worker pod scraped", all_workers_scraped, timeout=120, interval=2)
    assert all(t["health"] == "up" for t in operator_targets), operator_targets
    results["worker_pods"] = sorted(worker_pods)

    def firing_for(name: str) -> list[dict[str, Any]] | None:
        found = [
            a for a in prometheus.alerts()
            if a["labels"]["alertname"] == name and a["state"] == "firing"
            and a["labels"].get("tenant") == tenant
        ]  # fmt: skip
        return found or None

    # A few calls with several turns each on the healthy agent: two at once, then one more.
    try:
        turns = await asyncio.gather(
            *(_conversation(livekit, tenant, "quality", i) for i in (0, 1))
        )
        # The worker admits two agent calls; a job counts until its process has ended, a moment
        # after its caller left. The next caller is for the agent, not the overflow treatment:
        # call once the worker itself reports both calls over.
        await asyncio.to_thread(
            wait_for,
            "the quality worker to report its two calls ended",
            lambda: _agent_calls_running(cluster, tenant, "quality") == 0,
            60,
        )
        turns.append(await _conversation(livekit, tenant, "quality", 2))
    except Exception as error:
        raise AssertionError(f"{error!r}\n{_worker_logs(cluster, tenant, 'quality')}") from error
    results["turns"] = sum(turns)

    # The full setup: dispatches arrive at once on a worker with one slot. One job takes the
    # slot and holds it (its agent waits in the room for a caller); the next callers get the
    # overflow treatment (counted in voicefleet_calls_overflowed_total). Bursts are repeated (a
    # few at most) until the worker counted an overflow while its slot is taken.
    rooms: list[str] = []
    try:
        rooms, bursts = await _burst_until_overflowed(livekit, prometheus, tenant, "full")
        results["full_bursts"] = bursts

        # Every panel's query has data (Prometheus scrapes every 5 s; rates need two samples).
        pending = observability.all_queries()
        deadline = time.monotonic() + 180
        empty: list[str] = []
        while time.monotonic() < deadline:
            empty = [str(q) for q in pending if not _series_of(prometheus, q)]
            if not empty:
                break
            await asyncio.sleep(5)
        results["empty_queries"] = empty
        assert not empty, "queries without a series:\n" + "\n".join(empty)

        # The capacity alert fires for the full agent and the crashing one, and only for them.
        def capacity_alert() -> list[dict[str, Any]] | None:
            firing = [
                a for a in prometheus.alerts()
                if a["labels"]["alertname"] == "VoiceFleetNoSpareCapacity"
                and a["state"] == "firing" and a["labels"].get("tenant") == tenant
            ]  # fmt: skip
            # `crashing` too: its wanted worker never runs, so it has no free slot at all.
            return (
                firing if {"full", "crashing"} <= {a["labels"]["agent"] for a in firing} else None
            )

        firing = await asyncio.to_thread(
            wait_for, "VoiceFleetNoSpareCapacity to fire", capacity_alert, 120, 2
        )
        assert {a["labels"]["agent"] for a in firing} == {"full", "crashing"}, firing
        alert = next(a for a in firing if a["labels"]["agent"] == "full")
        assert alert["annotations"]["runbook_url"].endswith("#voicefleetnosparecapacity")
        assert f"{tenant}/full" in alert["annotations"]["summary"]
        results["capacity_alert"] = alert

        # Beyond its slot and its overflow slots, the full agent's worker refuses offers; the
        # refusals alert fires for it, naming the reason.
        refused_rooms = await _burst_until_refused(livekit, prometheus, tenant, "full")
        rooms += refused_rooms
        found = await asyncio.to_thread(
            wait_for,
            "VoiceFleetDispatchRejections to fire",
            lambda: firing_for("VoiceFleetDispatchRejections"),
            120,
            2,
        )
        assert {(a["labels"]["agent"], a["labels"]["reason"]) for a in found} == {
            ("full", "overflow_full")
        }, found
        results["VoiceFleetDispatchRejections"] = found[0]["labels"]
    finally:
        await _delete_rooms(livekit, rooms)

    # The operator's reconcile and telephony errors reach their alerts too, and the quality
    # agent's slow turns the turn latency alert.
    for name, agent_name in (
        ("VoiceFleetReconcileErrors", "broken"),
        ("VoiceFleetTelephonyNotReady", "broken"),
        ("VoiceFleetTurnLatencyHigh", "quality"),
    ):
        found = await asyncio.to_thread(
            wait_for, f"{name} to fire", lambda n=name: firing_for(n), 120, 2
        )
        assert {a["labels"]["agent"] for a in found} == {agent_name}, found
        results[name] = found[0]["labels"]

    # The crashing worker: its container was OOM-killed and restarted (the cause), and the
    # crash-loop alert names its pod.
    def crash_looping() -> list[dict[str, Any]] | None:
        pods = _kubectl_json(
            cluster, "-n", workers, "get", "pods", "-l", f"{render.LABEL_VOICE_AGENT}=crashing"
        )["items"]
        restarted = {
            pod["metadata"]["name"]
            for pod in pods
            for container in (pod.get("status") or {}).get("containerStatuses") or []
            if container["restartCount"] > 0
            and ((container.get("lastState") or {}).get("terminated") or {}).get("reason")
            == "OOMKilled"
        }
        firing = [
            a for a in prometheus.alerts()
            if a["labels"]["alertname"] == "VoiceFleetWorkersCrashLooping"
            and a["state"] == "firing" and a["labels"].get("namespace") == workers
        ]  # fmt: skip
        return firing if restarted and firing else None

    found = await asyncio.to_thread(
        wait_for, "VoiceFleetWorkersCrashLooping to fire", crash_looping, 180, 2
    )
    assert {a["labels"]["pod"].rsplit("-", 2)[0] for a in found} == {"crashing"}, found
    assert found[0]["annotations"]["runbook_url"].endswith("#voicefleetworkerscrashlooping")
    results["VoiceFleetWorkersCrashLooping"] = found[0]["labels"]

    # The plot of this run, from the same Prometheus.
    output, lines = plot.plot(PLOT_FILE, start=started - 60, end=time.time(), tenant=tenant)
    assert output.stat().st_size > 10_000
    assert any(line.label.startswith(f"{tenant}/quality") for line in lines["latency"])
    assert any(line.label == f"{tenant}/full" for line in lines["calls"])
    results["plot"] = str(output)
    RESULTS_FILE.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


BURST = 3
MAX_BURSTS = 5


async def _delete_rooms(livekit: LiveKitEndpoint, rooms: list[str]) -> None:
    async with livekit.api() as lkapi:
        for room in rooms:
            with contextlib.suppress(Exception):
                await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))


def _value(prometheus: PrometheusClient, expr: str) -> float:
    return sum(sample.value for sample in prometheus.query(expr))


async def _burst_until_overflowed(
    livekit: LiveKitEndpoint, prometheus: PrometheusClient, tenant: str, agent: str
) -> tuple[list[str], int]:
    """Dispatch BURST rooms at once to an idle one-slot agent until its worker gave a caller
    the overflow treatment; returns the last burst's rooms (one of them holds the slot) and the
    bursts it took."""
    labels = f'tenant="{tenant}", agent="{agent}"'
    overflowed = f"sum(voicefleet_calls_overflowed_total{{{labels}}})"
    active = f"sum(voicefleet_active_jobs{{{labels}}})"
    name = dispatch_name(tenant, agent)
    for burst in range(1, MAX_BURSTS + 1):
        rooms = [f"obs-{agent}-burst{burst}-{i}-{int(time.time())}" for i in range(BURST)]
        async with livekit.api() as lkapi:
            for room in rooms:
                await lkapi.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=600))
            await asyncio.gather(
                *(
                    lkapi.agent_dispatch.create_dispatch(
                        api.CreateAgentDispatchRequest(agent_name=name, room=room)
                    )
                    for room in rooms
                )
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _value(prometheus, overflowed) > 0 and _value(prometheus, active) >= 1:
                return rooms, burst
            await asyncio.sleep(2)
        # No overlap this time: free the slot and try again from an idle worker.
        await _delete_rooms(livekit, rooms)
        await asyncio.to_thread(
            wait_for, f"{agent} to be idle again", lambda: _value(prometheus, active) == 0, 60, 2
        )
    raise AssertionError(
        f"{MAX_BURSTS} bursts of {BURST} simultaneous dispatches to {tenant}/{agent} (one slot) "
        "never gave a caller the overflow treatment"
    )


REFUSAL_BURST = 8  # beyond the one slot and the worker's 4 overflow slots


async def _burst_until_refused(
    livekit: LiveKitEndpoint, prometheus: PrometheusClient, tenant: str, agent: str
) -> list[str]:
    """Dispatch REFUSAL_BURST rooms at once to an agent whose slot is taken, until its worker
    refused an offer (its overflow slots full: the offers that arrive before its next load
    report are refused); returns every room dispatched."""
    labels = f'tenant="{tenant}", agent="{agent}"'
    refused = f"sum(voicefleet_dispatch_rejected_total{{{labels}}})"
    name = dispatch_name(tenant, agent)
    rooms: list[str] = []
    for burst in range(1, MAX_BURSTS + 1):
        batch = [f"obs-{agent}-refuse{burst}-{i}-{int(time.time())}" for i in range(REFUSAL_BURST)]
        rooms += batch
        async with livekit.api() as lkapi:
            for room in batch:
                await lkapi.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=600))
            await asyncio.gather(
                *(
                    lkapi.agent_dispatch.create_dispatch(
                        api.CreateAgentDispatchRequest(agent_name=name, room=room)
                    )
                    for room in batch
                )
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _value(prometheus, refused) > 0:
                return rooms
            await asyncio.sleep(2)
    raise AssertionError(
        f"{MAX_BURSTS} bursts of {REFUSAL_BURST} simultaneous dispatches to {tenant}/{agent} "
        "(slot taken) never got an offer refused"
    )
