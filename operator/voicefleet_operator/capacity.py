"""The truth about capacity: the CapacityLimited condition, from what the autoscaler saw.

CapacityLimited=True says callers may be getting the overflow treatment now or soon because the
fleet cannot grow, with the first reason that applies:

- PodsUnschedulable: worker pods the scheduler cannot place (their PodScheduled condition is
  False/Unschedulable, e.g. no node with the CPU they request): the fleet is smaller than asked;
- MaxReplicasReached: the calls fill the most pods spec.scaling.maxReplicas allows, each at
  floor(jobsPerWorker x loadThreshold);
- TenantLimitReached: the calls in progress reached spec.limits.maxConcurrentCalls or the
  VoiceAgent's share of the platform's cap for its namespace.

False (WithinCapacity) otherwise. Pure: the autoscaler passes the pods and the calls it counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from voicefleet_runtime.admission import OverflowReason, worker_capacity

from voicefleet_operator.admission import FleetCap
from voicefleet_operator.api import CONDITION_CAPACITY_LIMITED, VoiceAgentSpec
from voicefleet_operator.scaling import max_replicas_within_cap
from voicefleet_operator.status import ConditionUpdate

PODS_UNSCHEDULABLE = "PodsUnschedulable"
MAX_REPLICAS_REACHED = "MaxReplicasReached"
TENANT_LIMIT_REACHED = "TenantLimitReached"
WITHIN_CAPACITY = "WithinCapacity"


@dataclass(frozen=True)
class Unschedulable:
    pod: str
    message: str


def unschedulable_pods(pods: Iterable[Mapping[str, Any]]) -> list[Unschedulable]:
    """Worker pods the scheduler reported it cannot place (not being deleted, not bound to a
    node: a pod bound since, e.g. by another scheduler or once room was made, may still carry
    the stale verdict until its kubelet reports)."""
    found = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if metadata.get("deletionTimestamp") or (pod.get("spec") or {}).get("nodeName"):
            continue
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                found.append(Unschedulable(metadata.get("name", "?"), condition.get("message", "")))
    return found


def no_worker_can_start(pods: Iterable[Mapping[str, Any]]) -> str:
    """Why none of the fleet's pods can become a worker, or "" when one may: every worker pod
    not being deleted is one the scheduler reported it cannot place (at least one). The
    operator's standby then turns a held caller away at once instead of after the wake
    timeout (wake.py). A pod that is scheduled (starting, or crash-looping) may still register,
    so it keeps the callers waiting."""
    serving = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    stuck = unschedulable_pods(serving)
    if not stuck or len(stuck) < len(serving):
        return ""
    first = stuck[0]
    detail = f": {first.message}" if first.message else ""
    return f"no worker pod can be scheduled ({first.pod}{detail})"


def capacity_condition(
    spec: VoiceAgentSpec,
    *,
    pods: Iterable[Mapping[str, Any]],
    active_jobs: int,
    cap: FleetCap | None = None,
) -> ConditionUpdate:
    """`active_jobs`: the agent calls counted; `cap`: the cap that applies now (the lower of
    spec.limits.maxConcurrentCalls and the VoiceAgent's share of the namespace's cap), else
    spec.limits alone."""
    stuck = unschedulable_pods(pods)
    if stuck:
        first = stuck[0]
        detail = f": {first.message}" if first.message else ""
        return ConditionUpdate.true(
            CONDITION_CAPACITY_LIMITED,
            PODS_UNSCHEDULABLE,
            f"{len(stuck)} worker pod(s) cannot be scheduled ({first.pod}{detail}); callers "
            "beyond the running workers get spec.overflow",
        )
    if cap is None:
        cap = FleetCap(spec.limits.max_concurrent_calls, OverflowReason.AGENT_LIMIT)
    limit = cap.calls
    most_pods = max_replicas_within_cap(spec)
    per_pod = worker_capacity(spec.worker.jobs_per_worker, spec.worker.load_threshold)
    fleet_most = most_pods * per_pod
    if active_jobs >= fleet_most and (limit is None or fleet_most < limit):
        return ConditionUpdate.true(
            CONDITION_CAPACITY_LIMITED,
            MAX_REPLICAS_REACHED,
            f"{active_jobs} calls fill the {most_pods} worker pod(s) allowed "
            f"(spec.scaling.maxReplicas; {per_pod} calls each, floor(jobsPerWorker x "
            "loadThreshold)); further callers get spec.overflow",
        )
    if limit is not None and active_jobs >= limit:
        which = (
            "the platform's cap for the namespace (this VoiceAgent's share)"
            if cap.reason is OverflowReason.NAMESPACE_LIMIT
            else "spec.limits.maxConcurrentCalls"
        )
        return ConditionUpdate.true(
            CONDITION_CAPACITY_LIMITED,
            TENANT_LIMIT_REACHED,
            f"{active_jobs} calls in progress reached {which} ({limit}); further callers get "
            "spec.overflow",
        )
    return ConditionUpdate.false(
        CONDITION_CAPACITY_LIMITED,
        WITHIN_CAPACITY,
        "the fleet can grow to take more calls" if limit is None else f"below the cap of {limit}",
    )


def capacity_event(
    previous: Mapping[str, Any] | None, update: ConditionUpdate
) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event to post when the condition changes, else None."""
    before = (previous or {}).get("status"), (previous or {}).get("reason")
    if before == (update.status, update.reason):
        return None
    if update.status == "True":
        return "Warning", update.reason, update.message
    if before[0] == "True":
        return "Normal", "CapacityRestored", update.message
    return None
