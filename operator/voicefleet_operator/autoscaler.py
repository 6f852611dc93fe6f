"""The autoscaler's loop body: read the workers, decide, act. Called by a kopf timer per
VoiceAgent (handlers.py); the maths is in scaling.py.

One evaluation:
1. read every serving worker pod's report (GET /report on worker.metricsPort, typed in the
   runtime's contract; unreachable = full); each pod is judged by the capacity it reports;
2. bring each pod's pod-deletion-cost in step with its jobs, *before* any scale-down, so the
   ReplicaSet removes idle pods first;
3. decide the replicas and set them, with the scale-down window, by server-side apply under a
   field manager of its own: the reconcile's apply leaves `spec.replicas` out, so the two never
   fight over it, and the window (an annotation) survives an operator restart;
4. return what the status, Events and metrics should say (the handler writes the status).

In HPA mode the HorizontalPodAutoscaler owns the replicas: only steps 1, 2 and 4 run. A pin
(`spec.scaling.replicas`) is applied here in both modes, so the replicas have one writer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from voicefleet_operator import admission, metrics
from voicefleet_operator.api import (
    CONDITION_SCALING_ACTIVE,
    SpecError,
    VoiceAgentSpec,
    parse_spec,
)
from voicefleet_operator.capacity import capacity_condition, unschedulable_pods
from voicefleet_operator.kube import Kube, NotFound
from voicefleet_operator.render import ChildNames, VoiceAgentRef, selector_labels
from voicefleet_operator.scaling import (
    DEFAULT_READ_TIMEOUT_SECONDS,
    SCALE_DOWN_ANNOTATION,
    Decision,
    FleetLoad,
    PendingScaleDown,
    Reason,
    ScalingPolicy,
    WorkerPod,
    WorkerState,
    decide,
    deletion_cost_patch,
    deletion_cost_updates,
    demand_replicas,
    read_fleet,
)
from voicefleet_operator.status import ConditionUpdate

FIELD_MANAGER = "voicefleet-autoscaler"
"""Owner of the worker Deployment's spec.replicas and of the scale-down window annotation."""

INTERVAL_SECONDS = 5.0
"""How often each VoiceAgent is evaluated; with spareJobs this bounds how late a scale-up is."""
WAKING_INTERVAL_SECONDS = 1.0
"""How often while callers wait for a fleet to wake from zero (wake.py): how late a registered
worker is noticed."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingEvent:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation saw and did, for the status, an Event and the logs."""

    condition: ConditionUpdate
    status_fields: dict[str, Any] = field(default_factory=dict)
    event: ScalingEvent | None = None
    decision: Decision | None = None
    fleet: FleetLoad | None = None
    replicas_before: int | None = None
    deployment: dict[str, Any] | None = None
    """The worker Deployment as last read or written (None when there is none)."""
    capacity: ConditionUpdate | None = None
    """CapacityLimited (capacity.py), when the workers were read."""
    registered_workers: int = 0
    """Serving worker pods registered with LiveKit (Ready, or answering /ready when callers
    wait for the fleet to wake); 0 once the decision is zero replicas."""


def _selector(name: str) -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def _owns_replicas(deployment: Mapping[str, Any]) -> bool:
    """Whether our field manager already holds spec.replicas (see module doc, step 3)."""
    for entry in deployment.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply":
            spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if "f:replicas" in spec:
                return True
    return False


def _round_load(load: float) -> float:
    return round(load, 3)


def _inactive(reason: str, message: str) -> Evaluation:
    return Evaluation(ConditionUpdate.false(CONDITION_SCALING_ACTIVE, reason, message))


async def evaluate(
    kube: Kube,
    body: Mapping[str, Any],
    *,
    now: datetime | None = None,
    request_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS,
    namespace_cap: int | None = None,
    waiting_calls: int = 0,
) -> Evaluation:
    """One autoscaler evaluation of the VoiceAgent `body` (see module doc). `namespace_cap`:
    the platform's cap on the calls of the VoiceAgent's namespace (settings); `waiting_calls`:
    callers the operator's standby holds while the fleet wakes from zero (wake.py), counted as
    calls: they need workers now."""
    ref = VoiceAgentRef.from_body(body)
    labels = (ref.namespace, ref.name)
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        # ConfigValid says what is wrong; the running workers keep their replicas meanwhile.
        return _inactive("ConfigInvalid", "the spec is invalid (see ConfigValid); replicas kept")
    policy = ScalingPolicy.from_spec(spec)
    names = ChildNames.of(ref.name)

    deployment = await kube.get("Deployment", ref.worker_namespace, names.deployment)
    if deployment is None or deployment.get("metadata", {}).get("deletionTimestamp"):
        return _inactive("NoDeployment", "the worker Deployment does not exist yet")

    started = time.monotonic()
    raw_pods = await kube.list("Pod", ref.worker_namespace, _selector(ref.name))
    pods = [WorkerPod.from_pod(p) for p in raw_pods]
    fleet = await read_fleet(pods, spec.worker.metrics_port, request_seconds=request_seconds)
    registered = registered_workers(pods, fleet)
    metrics.WORKER_READ_SECONDS.labels(*labels).observe(time.monotonic() - started)

    await _update_deletion_costs(kube, ref.worker_namespace, pods, fleet, policy.jobs_per_worker)

    jobs_per_worker = policy.jobs_per_worker
    active_jobs = fleet.active_jobs(jobs_per_worker)
    load = _round_load(fleet.load(jobs_per_worker))
    unreachable = fleet.count(WorkerState.UNREACHABLE)
    metrics.OBSERVED_ACTIVE_JOBS.labels(*labels).set(active_jobs)
    metrics.OBSERVED_LOAD.labels(*labels).set(load)
    metrics.UNREACHABLE_WORKERS.labels(*labels).set(unreachable)
    metrics.UNSCHEDULABLE_WORKERS.labels(*labels).set(len(unschedulable_pods(raw_pods)))
    cap = await _share_the_caps(ref, spec, pods, fleet, namespace_cap, request_seconds)
    # The calls the workers report running (an unreachable worker is full for sizing, but
    # it holds no call anyone saw): CapacityLimited says what callers meet.
    reports = fleet.reports()
    reported_calls = sum(r.agent_jobs for r in reports.values()) if reports else active_jobs
    capacity = capacity_condition(spec, pods=raw_pods, active_jobs=reported_calls, cap=cap)
    readings = _readings_note(fleet)

    current = int((deployment.get("spec") or {}).get("replicas", 1))
    fields: dict[str, Any] = {"activeJobs": active_jobs, "load": load}

    if spec.scaling.mode == "hpa" and policy.pinned_replicas is None:
        fields["desiredReplicas"] = current
        metrics.DESIRED_REPLICAS.labels(*labels).set(current)
        demand = demand_replicas(active_jobs, policy)
        return Evaluation(
            ConditionUpdate.true(
                CONDITION_SCALING_ACTIVE,
                "HorizontalPodAutoscaler",
                f"the HorizontalPodAutoscaler {names.deployment} sets the replicas on "
                f"voicefleet_worker_load; {active_jobs} active jobs would need {demand} "
                f"replicas with spareJobs{readings}",
            ),
            fields,
            fleet=fleet,
            replicas_before=current,
            deployment=deployment,
            capacity=capacity,
            registered_workers=registered,
        )

    annotations = deployment.get("metadata", {}).get("annotations") or {}
    pending = PendingScaleDown.from_annotation(annotations.get(SCALE_DOWN_ANNOTATION))
    decision = decide(
        current_replicas=current,
        active_jobs=active_jobs + waiting_calls,
        policy=policy,
        pending=pending,
        now=now or datetime.now(UTC),
    )
    metrics.SCALING_DECISIONS.labels(*labels, decision.reason.value).inc()
    metrics.DESIRED_REPLICAS.labels(*labels).set(decision.replicas)
    # Both directions exist from the first evaluation at 0, so "no change yet" is a series of
    # zeros rather than no data (dashboards and increase() need the series to exist).
    for direction in ("up", "down"):
        metrics.SCALING_CHANGES.labels(*labels, direction)
    fields["desiredReplicas"] = decision.replicas

    if (
        decision.replicas != current
        or decision.pending != pending
        or not _owns_replicas(deployment)
    ):
        await _apply_replicas(kube, ref.worker_namespace, names.deployment, decision)

    event = None
    if decision.replicas != current:
        direction = "up" if decision.replicas > current else "down"
        metrics.SCALING_CHANGES.labels(*labels, direction).inc()
        reason = "ScaledUp" if direction == "up" else "ScaledDown"
        if decision.reason is Reason.PINNED:
            reason = "ScaledToPin"
        event = ScalingEvent(
            "Normal", reason, f"{current} -> {decision.replicas} replicas: {decision.message}"
        )
        log.info(
            "%s/%s: %s (%s)%s", ref.namespace, ref.name, event.message, decision.reason, readings
        )

    if decision.reason is Reason.PINNED:
        condition = ConditionUpdate.false(
            CONDITION_SCALING_ACTIVE,
            "Pinned",
            f"spec.scaling.replicas pins {decision.replicas} replicas; remove it to autoscale "
            f"({active_jobs} active jobs would need {decision.demand}){readings}",
        )
    else:
        condition = ConditionUpdate.true(
            CONDITION_SCALING_ACTIVE, decision.reason.value, decision.message + readings
        )
    return Evaluation(
        condition,
        fields,
        event,
        decision,
        fleet,
        current,
        deployment,
        capacity,
        registered_workers=registered if decision.replicas > 0 else 0,
    )


def registered_workers(pods: list[WorkerPod], fleet: FleetLoad) -> int:
    """Serving pods registered with LiveKit: Ready ones (the readiness probe is GET /ready), and
    the others whose report says registered now (a pod turns Ready only at its next probe, up to
    periodSeconds later: too late for a caller waiting on a wake)."""
    reports = fleet.reports()
    return sum(
        1
        for pod in pods
        if not pod.terminating
        and (
            pod.ready
            or (pod.name in reports and reports[pod.name].registered
                and not reports[pod.name].draining)
        )
    )  # fmt: skip


NAMESPACE_LEDGER_TTL_SECONDS = 30.0
"""A VoiceAgent's calls count towards its namespace's cap until this long after its last
reading (a deleted VoiceAgent drops out by itself)."""

_namespace_calls: dict[str, dict[str, tuple[int, float]]] = {}
"""namespace -> VoiceAgent -> (agent calls, monotonic time of the reading)."""


async def _share_the_caps(
    ref: VoiceAgentRef,
    spec: VoiceAgentSpec,
    pods: list[WorkerPod],
    fleet: FleetLoad,
    namespace_cap: int | None,
    request_seconds: float,
) -> admission.FleetCap:
    """Push each reporting worker its share of the caps (admission.py); returns the cap that
    applies."""
    reports = fleet.reports()
    calls = sum(report.agent_jobs for report in reports.values())
    now = time.monotonic()
    ledger = _namespace_calls.setdefault(ref.namespace, {})
    if reports or ref.name not in ledger:
        ledger[ref.name] = (calls, now)
    for name, (_, at) in list(ledger.items()):
        if now - at > NAMESPACE_LEDGER_TTL_SECONDS:
            del ledger[name]
    share = None
    if namespace_cap is not None:
        active = {name: counted for name, (counted, _) in ledger.items()}
        share = admission.namespace_share(namespace_cap, ref.name, active, active)
    cap = admission.fleet_cap(spec.limits.max_concurrent_calls, share)
    if reports:
        budgets = admission.pod_budgets(cap.calls, reports)
        updates = admission.push_order(budgets, reports, cap.reason)
        if updates:
            by_name = {pod.name: pod for pod in pods}
            async with aiohttp.ClientSession() as session:
                await admission.push(
                    session, by_name, spec.worker.metrics_port, updates, request_seconds
                )
    return cap


def _readings_note(fleet: FleetLoad) -> str:
    """Why the numbers may be conservative: workers that did not answer count as full."""
    unreachable = fleet.count(WorkerState.UNREACHABLE)
    starting = fleet.count(WorkerState.STARTING)
    notes = []
    if unreachable:
        notes.append(f"{unreachable} unreachable worker(s) counted as full")
    if starting:
        notes.append(f"{starting} worker(s) starting")
    return f"; {', '.join(notes)}" if notes else ""


async def _update_deletion_costs(
    kube: Kube, namespace: str, pods: list[WorkerPod], fleet: FleetLoad, jobs_per_worker: int
) -> None:
    current = {pod.name: pod.annotations for pod in pods}
    for pod, cost in deletion_cost_updates(fleet.workers, current, jobs_per_worker).items():
        try:
            await kube.merge_patch("Pod", namespace, pod, deletion_cost_patch(cost))
        except NotFound:
            continue  # gone since the listing


async def _apply_replicas(
    kube: Kube, namespace: str, deployment: str, decision: Decision
) -> dict[str, Any]:
    """Server-side apply of the replicas and the window alone, as FIELD_MANAGER (an annotation
    left out of a later apply is removed: the window ends with it)."""
    metadata: dict[str, Any] = {"name": deployment, "namespace": namespace}
    if decision.pending is not None:
        metadata["annotations"] = {SCALE_DOWN_ANNOTATION: decision.pending.to_annotation()}
    return await kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {"replicas": decision.replicas},
        },
        force=True,
        field_manager=FIELD_MANAGER,
    )
