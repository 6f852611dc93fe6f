"""The truth about capacity, with the real operator (its own process) on a real control plane:
a worker pod that cannot be scheduled (it requests more CPU than any node has) turns the
VoiceAgent's CapacityLimited condition True with PodsUnschedulable and the scheduler's message,
posts a Warning Event, shows in `kubectl get va`, within 30 s of the VoiceAgent's creation."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client as k8s
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import render
from voicefleet_testkit.waiting import wait_for

from tests.integration.test_operator import (  # noqa: F401  (fixtures)
    cluster,
    create_agent,
    example_spec,
    operator,
    platform,
    tenant,
    wait_condition,
)

pytestmark = pytest.mark.integration


def test_unschedulable_workers_show_as_capacity_limited(
    cluster: ClusterHandle,  # noqa: F811
    tenant: str,  # noqa: F811
    operator: OperatorProcess,  # noqa: F811
    record_property: Any,
) -> None:
    spec = example_spec()
    # No node has 500 CPUs (and the bare control plane has no node): the scheduler leaves the pod
    # Pending, PodScheduled=False/Unschedulable.
    spec["worker"]["resources"] = {"requests": {"cpu": "500"}, "limits": {"cpu": "500"}}
    created_at = time.monotonic()
    create_agent(cluster, tenant, "support", spec)
    agent = wait_condition(cluster, tenant, "support", "CapacityLimited", "True", timeout=30)
    shown_after = time.monotonic() - created_at
    limited = next(c for c in agent["status"]["conditions"] if c["type"] == "CapacityLimited")
    assert limited["reason"] == "PodsUnschedulable", limited
    assert "cannot be scheduled" in limited["message"], limited
    # The scheduler's own words (on a control plane without nodes: "no nodes available"), on
    # the pods in the tenant's worker namespace.
    pods = k8s.CoreV1Api(cluster.api_client).list_namespaced_pod(
        render.worker_namespace(tenant), label_selector="app.kubernetes.io/instance=support"
    )
    said = {
        c.message
        for pod in pods.items
        for c in ((pod.status.conditions if pod.status else None) or [])
        if c.type == "PodScheduled" and c.status == "False" and c.message
    }
    assert said and any(message in limited["message"] for message in said), (said, limited)

    def warning() -> Any:
        events = k8s.CoreV1Api(cluster.api_client).list_namespaced_event(
            tenant, field_selector="involvedObject.name=support"
        )
        return next(
            (e for e in events.items if e.reason == "PodsUnschedulable" and e.type == "Warning"),
            None,
        )

    event = wait_for("a PodsUnschedulable Warning Event on the VoiceAgent", warning, timeout=30)
    assert "cannot be scheduled" in event.message

    table = cluster.kubectl("get", "va", "-n", tenant, "support").splitlines()
    columns = table[0].split()
    assert table[1].split()[columns.index("CAPACITY")] == "PodsUnschedulable", table
    record_property("created_to_pods_unschedulable_s", round(shown_after, 2))
    print(f"capacity: CapacityLimited=PodsUnschedulable {shown_after:.1f}s after creation")
