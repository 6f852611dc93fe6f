"""Operator benchmark: time from `create VoiceAgent` to its reconcile being done, against a bare
kube-apiserver create + get round trip measured in the same run.

The operator runs as a host process (`python -m voicefleet_operator`, as its pod runs it) serving
one fresh namespace. Each VoiceAgent is the example's spec without telephony (SIP provisioning
is LiveKit's time, not the reconcile's) and scaled to zero (no worker pods: on this machine they
would compete with the operator for the CPU). "Reconciled" means status.observedGeneration has
reached metadata.generation with Reconciled=True: every child applied and the status written.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from voicefleet_operator.settings import PlatformSettings

from voicefleet_localdev import paths
from voicefleet_localdev.bench.workers import BenchError
from voicefleet_localdev.kubectl import kubectl
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.operator_process import OperatorProcess

EXAMPLE = paths.REPO_ROOT / "examples" / "voiceagent.yaml"
GROUP, VERSION, PLURAL = "voicefleet.dev", "v1alpha1", "voiceagents"
POLL_S = 0.02
RECONCILE_TIMEOUT_S = 60.0


def bench_voiceagent(name: str) -> dict[str, Any]:
    agent = yaml.safe_load(EXAMPLE.read_text())
    agent["metadata"] = {"name": name}
    spec = agent["spec"]
    spec.pop("telephony", None)
    spec["scaling"].update({"minReplicas": 0, "spareJobs": 0})
    return dict(agent)


def reconciled(agent: dict[str, Any]) -> bool:
    status = agent.get("status") or {}
    if status.get("observedGeneration", 0) < agent["metadata"]["generation"]:
        return False
    return any(
        c["type"] == "Reconciled" and c["status"] == "True" for c in status.get("conditions") or []
    )


def bench_settings(
    livekit: LiveKitEndpoint, namespaces: tuple[str, ...], secret_namespace: str
) -> PlatformSettings:
    """The operator's settings for a benchmark (reconcile and scale modes): serving only
    `namespaces`, the LiveKit Secret in `secret_namespace`."""
    host = paths.host_address_for_pods() or "127.0.0.1"
    return PlatformSettings(
        livekit_url=f"ws://{host}:7880",
        livekit_api_url=livekit.url.replace("ws://", "http://"),
        livekit_secret_name="voicefleet-livekit",
        livekit_secret_namespace=secret_namespace,
        runtime_image="localhost/voicefleet/runtime:dev",
        runtime_image_pull_policy="Never",
        watch_namespaces=namespaces,
    )


class Operator(OperatorProcess):
    """The operator as its pod runs it, serving only the benchmark's namespace."""

    def __init__(self, namespace: str, workdir: Path, livekit: LiveKitEndpoint) -> None:
        settings = bench_settings(livekit, (namespace,), namespace)
        super().__init__(settings, paths.kubeconfig(), workdir / "operator.log")

    def reconcile_histogram(self) -> tuple[float, float]:
        """(sum, count) of voicefleet_operator_reconcile_duration_seconds, all series."""
        text = self.metrics()
        totals = {"sum": 0.0, "count": 0.0}
        for part in totals:
            pattern = (
                rf"^voicefleet_operator_reconcile_duration_seconds_{part}(?:{{[^}}]*}})? (\S+)$"
            )
            totals[part] = sum(float(v) for v in re.findall(pattern, text, re.M))
        return totals["sum"], totals["count"]


def apiserver_round_trips(core: k8s.CoreV1Api, namespace: str, count: int) -> list[float]:
    """Create + get of a small ConfigMap: the API server's own floor for one object."""
    times = []
    for index in range(count):
        body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=f"rtt-{index}"), data={"k": "v"})
        started = time.monotonic()
        core.create_namespaced_config_map(namespace, body)
        core.read_namespaced_config_map(f"rtt-{index}", namespace)
        times.append(time.monotonic() - started)
    return times


def wait_reconciled(custom: k8s.CustomObjectsApi, namespace: str, names: list[str]) -> float:
    """Poll until every named VoiceAgent is reconciled; returns when the last one was seen so."""
    pending = set(names)
    deadline = time.monotonic() + RECONCILE_TIMEOUT_S
    while pending:
        if time.monotonic() > deadline:
            raise BenchError(f"not reconciled within {RECONCILE_TIMEOUT_S}s: {sorted(pending)}")
        for name in list(pending):
            agent = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            if reconciled(dict(agent)):  # type: ignore[call-overload]
                pending.discard(name)
        if pending:
            time.sleep(POLL_S)
    return time.monotonic()


def wait_deleted(custom: k8s.CustomObjectsApi, namespace: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while dict(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))["items"]:  # type: ignore[call-overload]
        if time.monotonic() > deadline:
            raise BenchError(f"VoiceAgents in {namespace} not deleted within {timeout_s}s")
        time.sleep(0.5)


def run(workdir: Path, *, sequential: int, burst: int, report: Any) -> dict[str, Any]:
    api = k8s_config.new_client_from_config(config_file=str(paths.kubeconfig()))
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    namespace = f"vf-bench-{secrets.token_hex(3)}"
    livekit = LiveKitEndpoint()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(paths.REPO_ROOT / "crds"))
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    operator = Operator(namespace, workdir, livekit)
    try:
        for name, data in {
            "voicefleet-livekit": {
                "LIVEKIT_API_KEY": livekit.api_key,
                "LIVEKIT_API_SECRET": livekit.api_secret,
            },
            "provider-keys": {
                "OPENAI_API_KEY": "b",
                "DEEPGRAM_API_KEY": "b",
                "ELEVEN_API_KEY": "b",
            },
            "acme-orders-api": {"authorization": "Bearer bench"},
        }.items():
            secret = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
            core.create_namespaced_secret(namespace, secret)
        baseline = apiserver_round_trips(core, namespace, max(sequential, 10))
        try:
            operator.start()
        except AssertionError as failed:
            raise BenchError(str(failed)) from None
        # One VoiceAgent first, not timed: the operator's first reconcile warms its caches.
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, bench_voiceagent("warmup")
        )
        wait_reconciled(custom, namespace, ["warmup"])
        one_by_one = []
        for index in range(sequential):
            name = f"seq-{index}"
            started = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, bench_voiceagent(name)
            )
            one_by_one.append(wait_reconciled(custom, namespace, [name]) - started)
        report(f"reconcile one at a time: {[round(t, 3) for t in one_by_one]}")
        names = [f"burst-{index}" for index in range(burst)]
        started = time.monotonic()
        for name in names:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, bench_voiceagent(name)
            )
        burst_s = wait_reconciled(custom, namespace, names) - started
        report(f"{burst} VoiceAgents at once: all reconciled in {burst_s:.2f}s")
        hist_sum, hist_count = operator.reconcile_histogram()
    except ApiException as error:
        raise BenchError(f"API error: {error.status} {error.reason}: {error.body}") from error
    finally:
        # The VoiceAgents carry the operator's finalizer: delete them while it still runs.
        with contextlib.suppress(ApiException, BenchError):
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            wait_deleted(custom, namespace)
        operator.stop()
        with contextlib.suppress(ApiException):
            core.delete_namespace(namespace)
        api.close()
    rtt = statistics.median(baseline)
    per_agent = statistics.median(one_by_one)
    return {
        "apiserver_create_get_median_s": round(rtt, 4),
        "reconcile_one_by_one_s": [round(t, 3) for t in one_by_one],
        "reconcile_median_s": round(per_agent, 3),
        "reconcile_vs_apiserver_ratio": round(per_agent / rtt, 1),
        "burst": {
            "voiceagents": burst,
            "all_reconciled_s": round(burst_s, 2),
            "per_voiceagent_s": round(burst_s / burst, 3),
            "per_voiceagent_vs_apiserver_ratio": round(burst_s / burst / rtt, 1),
        },
        "operator_reported_reconcile_mean_s": (
            round(hist_sum / hist_count, 4) if hist_count else None
        ),
        "operator_reconciles_counted": int(hist_count),
    }
