"""Fleet-wide caps: each worker's share of the VoiceAgent's and the namespace's call caps.

A worker enforces its own agent-call budget exactly (voicefleet_runtime.admission); the caps are
fleet-wide, so every autoscaler evaluation (5 s) takes each worker's report (GET /report on
worker.metricsPort, read once per evaluation by scaling.read_fleet) and pushes budgets (PUT
/admission) whose sum is the cap:

- the VoiceAgent's cap: spec.limits.maxConcurrentCalls;
- its share of the namespace's cap (platform settings): the calls it runs plus its part of what
  the namespace has left, split evenly over the namespace's VoiceAgents (remainder by name), so
  the shares of all VoiceAgents add up to the namespace cap;
- the lower of the two applies; a worker's budget never drops below the calls it runs (calls are
  never cut) and never exceeds its capacity, floor(jobsPerWorker x loadThreshold).

Budgets are lowered before any is raised, so the sum never exceeds the cap during a push. Bound
of error: the cap can be exceeded only by calls admitted between two readings on budgets that a
concurrent change elsewhere made stale (another VoiceAgent of the namespace growing in the same
5 s), and it is under-used by at most the budgets of workers that have not reported yet. A
worker that never got a push runs on its rendered budget (min(capacity, cap)).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from voicefleet_runtime.admission import (
    ADMISSION_PATH,
    AdmissionUpdate,
    OverflowReason,
    WorkerReport,
)

from voicefleet_operator.scaling import WorkerPod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetCap:
    calls: int | None
    """Agent calls the VoiceAgent may run now across its workers (None: no cap)."""
    reason: OverflowReason


def namespace_share(
    namespace_cap: int, agent: str, active: Mapping[str, int], agents: Iterable[str]
) -> int:
    """`agent`'s share of its namespace's cap: its calls plus its part of what is left.

    `active` holds the agent calls of the namespace's VoiceAgents as last read; `agents` all
    VoiceAgents of the namespace. The shares of all of them add up to the cap (or to the calls
    running, if those exceed it)."""
    names = sorted(set(agents) | {agent})
    free = max(0, namespace_cap - sum(active.get(name, 0) for name in names))
    part, remainder = divmod(free, len(names))
    return active.get(agent, 0) + part + (1 if names.index(agent) < remainder else 0)


def fleet_cap(agent_cap: int | None, namespace_share_calls: int | None) -> FleetCap:
    if agent_cap is None and namespace_share_calls is None:
        return FleetCap(None, OverflowReason.CAPACITY)
    if namespace_share_calls is None or (
        agent_cap is not None and agent_cap <= namespace_share_calls
    ):
        return FleetCap(agent_cap, OverflowReason.AGENT_LIMIT)
    return FleetCap(namespace_share_calls, OverflowReason.NAMESPACE_LIMIT)


def pod_budgets(cap: int | None, reports: Mapping[str, WorkerReport]) -> dict[str, int]:
    """Each reporting worker's budget: the calls it runs, plus the cap's remaining calls handed
    out one at a time to the worker with the most free capacity (ties by name). Without a cap,
    every worker's capacity."""
    if cap is None:
        return {pod: report.capacity for pod, report in reports.items()}
    budgets = {pod: min(report.agent_jobs, report.capacity) for pod, report in reports.items()}
    left = cap - sum(report.agent_jobs for report in reports.values())
    while left > 0:
        room = {pod: reports[pod].capacity - budget for pod, budget in budgets.items()}
        pod = max(sorted(room), key=lambda name: room[name], default=None)
        if pod is None or room[pod] <= 0:
            break
        budgets[pod] += 1
        left -= 1
    return budgets


def push_order(
    budgets: Mapping[str, int], reports: Mapping[str, WorkerReport], reason: OverflowReason
) -> list[tuple[str, AdmissionUpdate]]:
    """The updates that change something, lowered budgets first."""
    changes = []
    for pod, budget in budgets.items():
        report = reports[pod]
        effective_reason = reason if budget < report.capacity else OverflowReason.CAPACITY
        if (budget, effective_reason) != (report.budget, report.limit_reason):
            update = AdmissionUpdate(max_agent_jobs=budget, limit_reason=reason)
            changes.append((budget - report.budget, pod, update))
    return [(pod, update) for _, pod, update in sorted(changes, key=lambda c: (c[0], c[1]))]


# --- I/O ------------------------------------------------------------------------------------


def admission_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{ADMISSION_PATH}"


async def push(
    session: aiohttp.ClientSession,
    pods: Mapping[str, WorkerPod],
    port: int,
    updates: list[tuple[str, AdmissionUpdate]],
    request_seconds: float,
) -> list[str]:
    """PUT the updates in order (lowered first); returns the pods that did not take theirs."""
    failed = []
    for pod_name, update in updates:
        pod = pods[pod_name]
        if not pod.ip:
            failed.append(pod_name)
            continue
        try:
            timeout = aiohttp.ClientTimeout(total=request_seconds)
            async with session.put(
                admission_url(pod.ip, port),
                json=update.model_dump(mode="json", by_alias=True),
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    failed.append(pod_name)
        except (aiohttp.ClientError, TimeoutError):
            failed.append(pod_name)
    if failed:
        log.warning("admission budgets not taken by %s (next evaluation retries)", failed)
    return failed
