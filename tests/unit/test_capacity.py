"""The CapacityLimited condition and its Events, from the pods and calls the autoscaler saw."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator.admission import FleetCap
from voicefleet_operator.api import parse_spec
from voicefleet_operator.capacity import (
    MAX_REPLICAS_REACHED,
    PODS_UNSCHEDULABLE,
    TENANT_LIMIT_REACHED,
    WITHIN_CAPACITY,
    capacity_condition,
    capacity_event,
    unschedulable_pods,
)
from voicefleet_operator.status import ConditionUpdate
from voicefleet_runtime.admission import OverflowReason

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
INSUFFICIENT_CPU = "0/1 nodes are available: 1 Insufficient cpu."


def spec(**sections: Any) -> Any:
    document = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    for name, value in sections.items():
        document[name] = {**document.get(name, {}), **value}
    return parse_spec(document)


def pod(name: str, scheduled: str = "True", reason: str = "", **metadata: Any) -> dict[str, Any]:
    condition = {"type": "PodScheduled", "status": scheduled}
    if reason:
        condition |= {"reason": reason, "message": INSUFFICIENT_CPU}
    return {"metadata": {"name": name, **metadata}, "status": {"conditions": [condition]}}


def test_unschedulable_pods() -> None:
    pods = [
        pod("a"),
        pod("b", "False", "Unschedulable"),
        pod("c", "False", "SchedulingGated"),
        pod("d", "False", "Unschedulable", deletionTimestamp="2026-01-01T00:00:00Z"),
        {"metadata": {"name": "e"}, "status": {}},
        # bound to a node since: the scheduler's verdict is stale until its kubelet reports
        {**pod("f", "False", "Unschedulable"), "spec": {"nodeName": "node-1"}},
    ]
    assert [(p.pod, p.message) for p in unschedulable_pods(pods)] == [("b", INSUFFICIENT_CPU)]


# One pod at most (maxReplicas 1) of floor(2 x 1.0) = 2 calls.
SMALL = {"worker": {"jobsPerWorker": 2, "loadThreshold": 1.0}, "scaling": {"maxReplicas": 1}}


@pytest.mark.parametrize(
    ("sections", "pods", "active", "status", "reason"),
    [
        (SMALL, [pod("a")], 1, "False", WITHIN_CAPACITY),
        (SMALL, [pod("a")], 2, "True", MAX_REPLICAS_REACHED),
        (SMALL, [pod("a"), pod("b", "False", "Unschedulable")], 0, "True", PODS_UNSCHEDULABLE),
        # The cap is reached before the pods are full.
        (
            {**SMALL, "limits": {"maxConcurrentCalls": 2}},
            [pod("a")],
            2,
            "True",
            TENANT_LIMIT_REACHED,
        ),
        (
            {"limits": {"maxConcurrentCalls": 3}, "scaling": {"minReplicas": 0}},
            [pod("a")],
            3,
            "True",
            TENANT_LIMIT_REACHED,
        ),
        (
            {"limits": {"maxConcurrentCalls": 3}, "scaling": {"minReplicas": 0}},
            [pod("a")],
            2,
            "False",
            WITHIN_CAPACITY,
        ),
    ],
)
def test_capacity_condition(
    sections: dict[str, Any], pods: list[dict[str, Any]], active: int, status: str, reason: str
) -> None:
    update = capacity_condition(spec(**sections), pods=pods, active_jobs=active)
    assert (update.type, update.status, update.reason) == ("CapacityLimited", status, reason)
    assert update.message


def test_unschedulable_message_names_the_pod_and_the_scheduler_reason() -> None:
    update = capacity_condition(
        spec(**SMALL), pods=[pod("support-7", "False", "Unschedulable")], active_jobs=0
    )
    assert "support-7" in update.message and INSUFFICIENT_CPU in update.message


def test_events_on_changes_only() -> None:
    limited = ConditionUpdate.true("CapacityLimited", PODS_UNSCHEDULABLE, "stuck")
    fine = ConditionUpdate.false("CapacityLimited", WITHIN_CAPACITY, "ok")
    assert capacity_event(None, limited) == ("Warning", PODS_UNSCHEDULABLE, "stuck")
    assert capacity_event({"status": "True", "reason": PODS_UNSCHEDULABLE}, limited) is None
    assert capacity_event(
        {"status": "True", "reason": PODS_UNSCHEDULABLE},
        ConditionUpdate.true("CapacityLimited", MAX_REPLICAS_REACHED, "full"),
    ) == ("Warning", MAX_REPLICAS_REACHED, "full")
    assert capacity_event({"status": "True", "reason": PODS_UNSCHEDULABLE}, fine) == (
        "Normal",
        "CapacityRestored",
        "ok",
    )
    assert capacity_event(None, fine) is None


# What `kubectl describe` shows: each reason's message names the cause, the figures and the spec
# field that sets them, and says what callers get.
def test_messages_name_the_cause_and_the_field() -> None:
    stuck = pod("support-7", "False", "Unschedulable")
    update = capacity_condition(spec(**SMALL), pods=[stuck], active_jobs=0)
    assert update.message == (
        f"1 worker pod(s) cannot be scheduled (support-7: {INSUFFICIENT_CPU}); callers beyond "
        "the running workers get spec.overflow"
    )
    # No scheduler message, no name: still one clear sentence.
    bare: dict[str, Any] = {
        "metadata": {},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
        },
    }
    assert [(p.pod, p.message) for p in unschedulable_pods([bare])] == [("?", "")]
    assert capacity_condition(spec(**SMALL), pods=[bare], active_jobs=0).message == (
        "1 worker pod(s) cannot be scheduled (?); callers beyond the running workers get "
        "spec.overflow"
    )

    full = capacity_condition(spec(**SMALL), pods=[pod("a")], active_jobs=2)
    assert full.message == (
        "2 calls fill the 1 worker pod(s) allowed (spec.scaling.maxReplicas; 2 calls each, "
        "floor(jobsPerWorker x loadThreshold)); further callers get spec.overflow"
    )
    capped = {"limits": {"maxConcurrentCalls": 3}, "scaling": {"minReplicas": 0}}
    limited = capacity_condition(spec(**capped), pods=[pod("a")], active_jobs=3)
    assert limited.message == (
        "3 calls in progress reached spec.limits.maxConcurrentCalls (3); further callers get "
        "spec.overflow"
    )
    assert capacity_condition(spec(**capped), pods=[pod("a")], active_jobs=2).message == (
        "below the cap of 3"
    )
    assert capacity_condition(spec(), pods=[pod("a")], active_jobs=1).message == (
        "the fleet can grow to take more calls"
    )


def test_the_namespace_share_is_named_as_such() -> None:
    update = capacity_condition(
        spec(),
        pods=[pod("a")],
        active_jobs=4,
        cap=FleetCap(4, OverflowReason.NAMESPACE_LIMIT),
    )
    assert (update.status, update.reason) == ("True", TENANT_LIMIT_REACHED)
    assert update.message == (
        "4 calls in progress reached the platform's cap for the namespace (this VoiceAgent's "
        "share) (4); further callers get spec.overflow"
    )
    agent = capacity_condition(
        spec(), pods=[pod("a")], active_jobs=4, cap=FleetCap(4, OverflowReason.AGENT_LIMIT)
    )
    assert "reached spec.limits.maxConcurrentCalls (4)" in agent.message


def test_a_pod_being_deleted_does_not_hide_the_ones_after_it() -> None:
    pods = [
        pod("old", "False", "Unschedulable", deletionTimestamp="2026-01-01T00:00:00Z"),
        pod("new", "False", "Unschedulable"),
    ]
    assert [p.pod for p in unschedulable_pods(pods)] == ["new"]
