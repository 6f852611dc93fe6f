"""The chart on the local cluster: `helm install` runs the operator image (built by `make images`)
as a pod on the node; `kubectl apply -f examples/voiceagent.yaml` gives the children; and
`kubectl get va` shows printer columns whose values match what the cluster really runs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_localdev import chart, images, paths
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_testkit.waiting import wait_for

# Building and importing the images (setup) alone can take many minutes on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2700)]

REPO = paths.REPO_ROOT
EXAMPLE = REPO / "examples" / "voiceagent.yaml"
AGENT = "acme-support"  # the example's name
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


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: tuple[str, str],
) -> Iterator[str]:
    """`helm install` of the chart (voicefleet_localdev.chart, as the demo), operator pod Ready."""
    platform, tenant = namespaces
    # A release name of its own: the ClusterRole is named after it, and the demo may have
    # installed the chart as "voicefleet" in another namespace.
    release = f"vf-e2e-{tenant.rsplit('-', 1)[-1]}"
    # Only this test's tenant: other tests run their own operators on their namespaces.
    values = chart.local_values(watch_namespaces=[tenant], livekit=livekit, log_level="DEBUG")
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
