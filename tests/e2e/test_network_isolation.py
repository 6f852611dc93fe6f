"""Tenants cannot reach each other: the workers' NetworkPolicy, enforced by the local cluster's
NetworkPolicy implementation (kube-router's firewall, started with the node).

The chart (operator pod in the platform namespace) serves two tenants, A and B, each with one
VoiceAgent; A also runs its own webhook server (the testserver image) behind a Service, which
A's agent declares as a tool URL. A "monitoring" namespace holds a probe pod with the labels the
chart's networkPolicy.monitoring selects; tenant B holds a plain probe pod (no policy of ours).

Every denial is checked against the same port answering someone else, so a refusal means the
policy, not a closed port:
  - B's probe cannot connect to A's worker ports (health, metrics); the monitoring probe gets
    A's /metrics; the same B probe reaches A's webhook Service (nothing isolates that pod);
  - B's worker cannot connect to A's webhook Service; the same B worker reaches LiveKit;
  - A's worker reaches LiveKit (it is Ready: registered) and its declared tool URL;
  - the platform's Prometheus (on the node here) still scrapes every worker.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
from voicefleet_localdev import chart, images, paths
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.prometheus import PrometheusClient
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_testkit.providers import ProviderServer, openai_pipeline
from voicefleet_testkit.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

RELEASE = "vf-isolation"
WEBHOOK_PORT = 8080
MONITORING_LABELS = {"app.kubernetes.io/name": "prometheus-probe"}
# Run in a pod's Python: "open" when a TCP connection to argv[1]:argv[2] is accepted.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("open")
except OSError as error:
    print("closed", type(error).__name__, error)
"""
GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(3)
    names = {
        "platform": f"vf-iso-system-{suffix}",
        "a": f"iso-a-{suffix}",
        "b": f"iso-b-{suffix}",
        "monitoring": f"iso-mon-{suffix}",
    }
    for namespace in names.values():
        cluster_with_node.kubectl("create", "namespace", namespace)
    yield names
    for namespace in names.values():
        with contextlib.suppress(AssertionError):
            cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


def _apply(cluster: ClusterHandle, obj: dict[str, Any]) -> None:
    manifest = paths.state_dir() / f"isolation-e2e-{secrets.token_hex(4)}.json"
    manifest.write_text(json.dumps(obj))
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifest))
    finally:
        manifest.unlink(missing_ok=True)


def _json(cluster: ClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: dict[str, str],
) -> Iterator[str]:
    values = chart.local_values(
        watch_namespaces=[namespaces["a"], namespaces["b"]], livekit=livekit
    )
    values["networkPolicy"] = {
        "monitoring": {
            "namespaceSelector": {"kubernetes.io/metadata.name": namespaces["monitoring"]},
            "podSelector": MONITORING_LABELS,
        }
    }
    with installed_chart(
        cluster_with_node,
        RELEASE,
        namespaces["platform"],
        values,
        tenants=[namespaces["a"], namespaces["b"]],
        skip_crds=True,
    ):
        yield namespaces["platform"]


def _probe_pod(namespace: str, name: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", "import time; time.sleep(86400)"],
                }
            ],
        },
    }


def _voiceagent(
    namespace: str, name: str, providers: ProviderServer, tool_url: str | None
) -> dict[str, Any]:
    agent: dict[str, Any] = {"name": "front", "instructions": "You answer isolation tests."}
    spec: dict[str, Any] = {
        "agents": [agent],
        "entry": "front",
        "pipeline": openai_pipeline(providers.base_url),
        "secretRefs": [{"name": "provider-keys"}],
        "worker": {"jobsPerWorker": 1, "idleProcesses": 0},
        "scaling": {"minReplicas": 1, "maxReplicas": 1, "spareJobs": 0},
    }
    if tool_url is not None:
        agent["tools"] = ["lookup"]
        spec["tools"] = [
            {"name": "lookup", "description": "Look an order up.", "http": {"url": tool_url}}
        ]
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _ready_worker(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    """The VoiceAgent's Ready worker pod (Ready: registered with LiveKit, so it reached it), in
    the tenant's worker namespace."""
    workers = render.worker_namespace(namespace)

    def ready_pod() -> dict[str, Any] | None:
        agent = _json(cluster, "-n", namespace, "get", "va", name)
        conditions = (agent.get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return None
        pods = _json(
            cluster, "-n", workers, "get", "pods", "-l", f"app.kubernetes.io/instance={name}"
        )
        running = [
            p
            for p in pods["items"]
            if p["status"].get("podIP") and p["status"]["phase"] == "Running"
        ]
        return running[0] if running else None

    return wait_for(
        f"VoiceAgent {namespace}/{name} Ready with a running worker",
        ready_pod,
        timeout=400,
        interval=3,
        describe=lambda: cluster.diagnostics(workers),
    )


def _connect(cluster: ClusterHandle, namespace: str, pod: str, host: str, port: int) -> str:
    out = cluster.kubectl(
        "-n", namespace, "exec", pod, "--", "python", "-c", CONNECT, host, str(port)
    )
    return out.strip()


def _running(cluster: ClusterHandle, namespace: str, pod: str) -> bool:
    status = _json(cluster, "-n", namespace, "get", "pod", pod)["status"]
    return status.get("phase") == "Running" and bool(status.get("podIP"))


async def test_tenants_cannot_reach_each_other(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    prometheus: PrometheusClient,
    release: str,
    namespaces: dict[str, str],
    pod_providers: ProviderServer,
    project_images: dict[str, str],
) -> None:
    cluster = cluster_with_node
    a, b, monitoring = namespaces["a"], namespaces["b"], namespaces["monitoring"]
    runtime_image = project_images["runtime"]

    # Tenant A's own webhook server and its Service.
    webhook_labels = {"app": "orders-webhook"}
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orders-webhook", "namespace": a, "labels": webhook_labels},
        "spec": {"containers": [{"name": "server", "image": images.TESTSERVER_IMAGE,
                                 "imagePullPolicy": "Never"}]},
    })  # fmt: skip
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "orders-webhook", "namespace": a},
        "spec": {"selector": webhook_labels,
                 "ports": [{"port": WEBHOOK_PORT, "targetPort": 8080}]},
    })  # fmt: skip
    webhook_ip = _json(cluster, "-n", a, "get", "service", "orders-webhook")["spec"]["clusterIP"]
    tool_url = f"http://{webhook_ip}:{WEBHOOK_PORT}/lookup"

    for tenant in (a, b):
        _apply(cluster, {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "provider-keys", "namespace": tenant},
            "stringData": {"OPENAI_API_KEY": "sk-local-test-key"},
        })  # fmt: skip
    _apply(cluster, _voiceagent(a, "agent-a", pod_providers, tool_url))
    _apply(cluster, _voiceagent(b, "agent-b", pod_providers, None))
    _apply(cluster, _probe_pod(b, "probe", runtime_image, {"app": "probe"}))
    _apply(cluster, _probe_pod(monitoring, "scraper", runtime_image, MONITORING_LABELS))

    worker_a = _ready_worker(cluster, a, "agent-a")
    worker_b = _ready_worker(cluster, b, "agent-b")
    for namespace, pod in ((b, "probe"), (monitoring, "scraper")):
        wait_for(f"{namespace}/{pod} running", partial(_running, cluster, namespace, pod), 180, 2)
    a_ip = worker_a["status"]["podIP"]
    ports = {p["name"]: p["containerPort"] for p in worker_a["spec"]["containers"][0]["ports"]}
    livekit_address = urlsplit(livekit.url_for_pods)
    livekit_host, livekit_port = livekit_address.hostname or "", livekit_address.port or 80

    # The monitoring probe scrapes A's worker: the metrics port is open to whom the chart names.
    metrics = cluster.kubectl(
        "-n", monitoring, "exec", "scraper", "--",
        "python", "-c", GET, f"http://{a_ip}:{ports['metrics']}/metrics",
    )  # fmt: skip
    assert "voicefleet_" in metrics

    # B's probe pod reaches A's webhook Service (no policy of ours selects that pod) ...
    reached = wait_for(
        "B's probe reaching A's webhook Service",
        lambda: "open" == _connect(cluster, b, "probe", webhook_ip, WEBHOOK_PORT) or None,
        timeout=60,
        interval=2,
    )
    assert reached
    # ... but not A's worker: neither its metrics nor its health port.
    for port_name in ("metrics", "health"):
        outcome = _connect(cluster, b, "probe", a_ip, ports[port_name])
        assert outcome.startswith("closed"), f"B's probe reached A's worker {port_name}: {outcome}"
    # The same metrics port still answers the monitoring probe: the refusal was the policy.
    assert _connect(cluster, monitoring, "scraper", a_ip, ports["metrics"]) == "open"

    # A's worker reaches its declared tool URL (A's webhook Service).
    workers_a, workers_b = render.worker_namespace(a), render.worker_namespace(b)
    answer = cluster.kubectl(
        "-n", workers_a, "exec", worker_a["metadata"]["name"], "--", "python", "-c", GET, tool_url
    )
    assert "hello from" in answer

    # B's worker reaches LiveKit, but not A's webhook Service.
    pod_b = worker_b["metadata"]["name"]
    assert _connect(cluster, workers_b, pod_b, livekit_host, livekit_port) == "open"
    outcome = _connect(cluster, workers_b, pod_b, webhook_ip, WEBHOOK_PORT)
    assert outcome.startswith("closed"), f"B's worker reached A's webhook: {outcome}"
    # ... nor A's webhook pod directly.
    webhook_pod_ip = _json(cluster, "-n", a, "get", "pod", "orders-webhook")["status"]["podIP"]
    outcome = _connect(cluster, workers_b, pod_b, webhook_pod_ip, 8080)
    assert outcome.startswith("closed"), f"B's worker reached A's webhook pod: {outcome}"

    # The platform's Prometheus (a host process here: node traffic) scrapes both workers.
    workers = {worker_a["metadata"]["name"], pod_b}

    def all_workers_scraped() -> set[str] | None:
        prometheus.sync_discovery()
        up = {
            t["labels"].get("pod")
            for t in prometheus.active_targets()
            if t["labels"].get("namespace") in (workers_a, workers_b) and t["health"] == "up"
        }
        return up if workers <= up else None

    wait_for("both workers scraped by Prometheus", all_workers_scraped, timeout=180, interval=2)
