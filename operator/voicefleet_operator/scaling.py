"""Sizing a VoiceAgent's worker fleet on job load, without ever dropping a call.

livekit-server drops a dispatch when no worker is available (it does not queue it), so the fleet
always keeps `spareJobs` free job slots on top of the calls in progress:

    demand = clamp(ceil((activeJobs + spareJobs) / (jobsPerWorker * targetLoad)), min, max)

Scale-up happens at once; scale-down only after `scaleDownDelaySeconds` of lower demand, and then
to the highest demand seen in that window, so a flapping load never shrinks the fleet. A worker
that does not answer counts as full: an unknown worker is never taken for an idle one. Scale-down
takes idle pods first because every pod's `controller.kubernetes.io/pod-deletion-cost` follows its
active jobs; the runtime's drain on SIGTERM covers the moment between reading and deleting.

Everything here but `read_fleet` is pure (no I/O), so the maths is tested as a table.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from fractions import Fraction
from typing import Any

import aiohttp
from voicefleet_runtime.admission import REPORT_PATH, WorkerReport, worker_capacity, worker_load

from voicefleet_operator.api import VoiceAgentSpec

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
"""Read by the ReplicaSet controller: among ready pods, lower cost is deleted first."""

DELETION_COST_PER_JOB = 100
"""Cost of one active job; the spacing leaves room for tie-breakers without reordering jobs."""

SCALE_DOWN_ANNOTATION = "voicefleet.dev/scale-down-pending"
"""On the worker Deployment: when demand first fell below its replicas and the highest demand
since. Kept on the object (not only in memory) so an operator restart neither forgets a pending
scale-down nor starts its delay again from zero."""

LOAD_METRIC = "voicefleet_worker_load"
"""The runtime's per-worker gauge (active jobs / jobsPerWorker); the HPA scales on it. Spelled
out rather than imported: voicefleet_runtime.metrics pulls in prometheus multiprocess set-up the
operator has no use for (a unit test keeps the two in step)."""

DEFAULT_READ_TIMEOUT_SECONDS = 1.0


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingPolicy:
    """What the autoscaler needs from a VoiceAgent spec (worker and scaling sections)."""

    jobs_per_worker: int
    target_load: float
    spare_jobs: int
    min_replicas: int
    max_replicas: int
    scale_down_delay_seconds: float
    load_threshold: float = 1.0
    """The worker reports itself full to LiveKit at this load and takes no more calls."""
    pinned_replicas: int | None = None
    """`spec.scaling.replicas`: a platform team's manual pin, which the autoscaler obeys."""

    def __post_init__(self) -> None:
        if self.jobs_per_worker < 1:
            raise ValueError("worker.jobsPerWorker must be at least 1")
        if not 0 < self.target_load <= 1:
            raise ValueError("scaling.targetLoad must be in (0, 1]")
        if not 0 < self.load_threshold <= 1:
            raise ValueError("worker.loadThreshold must be in (0, 1]")
        if self.spare_jobs < 0:
            raise ValueError("scaling.spareJobs must not be negative")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("scaling.minReplicas must be between 0 and scaling.maxReplicas")
        if self.scale_down_delay_seconds < 0:
            raise ValueError("scaling.scaleDownDelaySeconds must not be negative")
        if self.pinned_replicas is not None and self.pinned_replicas < 0:
            raise ValueError("scaling.replicas must not be negative")

    @classmethod
    def from_spec(cls, spec: VoiceAgentSpec) -> ScalingPolicy:
        scaling, worker = spec.scaling, spec.worker
        return cls(
            jobs_per_worker=worker.jobs_per_worker,
            target_load=scaling.target_load,
            spare_jobs=scaling.spare_jobs,
            min_replicas=scaling.min_replicas,
            max_replicas=max_replicas_within_cap(spec),
            scale_down_delay_seconds=scaling.scale_down_delay_seconds,
            load_threshold=worker.load_threshold,
            pinned_replicas=scaling.replicas,
        )

    @property
    def planned_jobs_per_worker(self) -> Fraction:
        """Jobs one worker is planned to carry: jobsPerWorker * targetLoad.

        A worker takes no call once its load reaches loadThreshold, so planning above it would
        leave new calls without a worker; the lower of the two loads counts. Exact fractions keep
        ceil() honest (2 * 0.7 must not become 1.4000000000000001).
        """
        load = min(_exact(self.target_load), _exact(self.load_threshold))
        return self.jobs_per_worker * load


def max_replicas_within_cap(spec: VoiceAgentSpec) -> int:
    """maxReplicas, lowered to the pods the call cap can fill: ceil(cap / per-pod capacity).

    More pods could only take calls the cap refuses; this also bounds the fleet's calls
    physically (pods x capacity) whatever the workers are told."""
    cap = spec.limits.max_concurrent_calls
    if cap is None:
        return spec.scaling.max_replicas
    per_pod = worker_capacity(spec.worker.jobs_per_worker, spec.worker.load_threshold)
    needed = max(spec.scaling.min_replicas, math.ceil(cap / per_pod))
    return min(spec.scaling.max_replicas, needed)


def _exact(value: float) -> Fraction:
    # From the decimal text, as written in the manifest: Fraction(0.7) would be 0.69999...
    return Fraction(repr(value))


# --- what the workers report ----------------------------------------------------------------


class WorkerState(StrEnum):
    REPORTING = "Reporting"
    """Answered GET /report: its jobs and capacity are known."""
    UNREACHABLE = "Unreachable"
    """Ready (or reported before) but did not answer: counted as full, never as idle."""
    STARTING = "Starting"
    """Not ready yet and never reported: no capacity and no calls yet."""


@dataclass(frozen=True)
class WorkerReading:
    pod: str
    state: WorkerState
    report: WorkerReport | None = None
    """What the pod reported (REPORTING only)."""
    error: str = ""

    @property
    def active_jobs(self) -> int:
        return self.report.agent_jobs if self.report is not None else 0

    def counted_jobs(self, jobs_per_worker: int) -> int:
        """Agent calls this worker counts for: an unreachable worker counts as full of the
        spec's `jobs_per_worker` (it reported nothing to judge it by)."""
        if self.state is WorkerState.UNREACHABLE:
            return jobs_per_worker
        return self.active_jobs

    def slots(self, jobs_per_worker: int) -> int:
        """Jobs this worker carries at full load: its own report's jobsPerWorker (a pod of an
        older config keeps its own), the spec's when it reported nothing."""
        return self.report.jobs_per_worker if self.report is not None else jobs_per_worker


@dataclass(frozen=True)
class FleetLoad:
    """One reading of every serving (not terminating) worker pod of a fleet."""

    workers: tuple[WorkerReading, ...] = ()

    def active_jobs(self, jobs_per_worker: int) -> int:
        return sum(w.counted_jobs(jobs_per_worker) for w in self.workers)

    def load(self, jobs_per_worker: int) -> float:
        """The fleet's load as the workers define it (admission.worker_load): calls over the
        slots of the workers that carry load, each judged by its own report (0 when none do)."""
        counted = [w for w in self.workers if w.state is not WorkerState.STARTING]
        if not counted:
            return 0.0
        return worker_load(
            sum(w.counted_jobs(jobs_per_worker) for w in counted),
            sum(w.slots(jobs_per_worker) for w in counted),
        )

    def count(self, state: WorkerState) -> int:
        return sum(1 for w in self.workers if w.state is state)

    def reports(self) -> dict[str, WorkerReport]:
        """The reports of the pods that answered, by pod name."""
        return {w.pod: w.report for w in self.workers if w.report is not None}

    def registered(self) -> int:
        """Pods that report themselves registered with LiveKit and not draining."""
        return sum(
            1 for w in self.workers if w.report is not None and w.report.registered
            and not w.report.draining
        )  # fmt: skip


# --- the decision ---------------------------------------------------------------------------


class Reason(StrEnum):
    PINNED = "Pinned"
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    ABOVE_MAXIMUM = "AboveMaximum"
    SCALE_DOWN_PENDING = "ScaleDownPending"
    STEADY = "Steady"


@dataclass(frozen=True)
class PendingScaleDown:
    """Demand has been below the current replicas since `since`; `peak` is its highest value."""

    since: datetime
    peak: int

    def to_annotation(self) -> str:
        since = self.since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return json.dumps({"since": since, "peak": self.peak}, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, value: str | None) -> PendingScaleDown | None:
        """None for a missing or unreadable value: the delay then starts again (the safe way)."""
        if not value:
            return None
        try:
            data = json.loads(value)
            since = datetime.fromisoformat(str(data["since"]).replace("Z", "+00:00"))
            peak = int(data["peak"])
        except (ValueError, KeyError, TypeError):
            return None
        if since.tzinfo is None or peak < 0:
            return None
        return cls(since=since, peak=peak)


@dataclass(frozen=True)
class Decision:
    replicas: int
    """Replicas the Deployment should have now."""
    demand: int
    """Replicas the load alone asks for (within min..max)."""
    reason: Reason
    message: str
    pending: PendingScaleDown | None = None
    """The scale-down window to keep (None: no lower demand pending)."""


def demand_replicas(active_jobs: int, policy: ScalingPolicy) -> int:
    """ceil((activeJobs + spareJobs) / (jobsPerWorker * targetLoad)), within min..max."""
    wanted = math.ceil((active_jobs + policy.spare_jobs) / policy.planned_jobs_per_worker)
    return max(policy.min_replicas, min(policy.max_replicas, wanted))


def decide(
    *,
    current_replicas: int,
    active_jobs: int,
    policy: ScalingPolicy,
    pending: PendingScaleDown | None,
    now: datetime,
) -> Decision:
    """The replicas to set now, from the current replicas, the load and the pending window."""
    demand = demand_replicas(active_jobs, policy)
    per_worker = policy.planned_jobs_per_worker
    why = (
        f"{active_jobs} active jobs + {policy.spare_jobs} spare over "
        f"{float(per_worker):g} jobs per worker"
    )

    if policy.pinned_replicas is not None:
        pinned = policy.pinned_replicas
        return Decision(
            pinned, demand, Reason.PINNED, f"pinned to {pinned} by spec.scaling.replicas ({why})"
        )
    if demand >= current_replicas:
        reason = Reason.SCALE_UP if demand > current_replicas else Reason.STEADY
        return Decision(demand, demand, reason, f"{why} need {demand} replicas")
    if current_replicas > policy.max_replicas:
        # A lowered maximum is an order, not a change in demand: apply it now (drains keep calls).
        return Decision(
            policy.max_replicas,
            demand,
            Reason.ABOVE_MAXIMUM,
            f"{current_replicas} replicas exceed scaling.maxReplicas {policy.max_replicas}",
        )

    # Demand is lower: wait for scaleDownDelaySeconds of it, then go to the window's peak.
    if pending is None or pending.since > now or pending.peak >= current_replicas:
        # No window yet, or one from another time (clock skew, replicas changed by hand).
        pending = PendingScaleDown(since=now, peak=demand)
    else:
        pending = replace(pending, peak=max(pending.peak, demand))
    waited = (now - pending.since).total_seconds()
    if waited >= policy.scale_down_delay_seconds:
        target = min(max(pending.peak, policy.min_replicas), current_replicas)
        return Decision(
            target,
            demand,
            Reason.SCALE_DOWN,
            f"{why} need {demand} replicas (at most {pending.peak} "
            f"for {waited:.0f}s); scaling down to {target}",
        )
    return Decision(
        current_replicas,
        demand,
        Reason.SCALE_DOWN_PENDING,
        f"{why} need {demand} replicas; keeping {current_replicas} until demand stays lower "
        f"for {policy.scale_down_delay_seconds:g}s (lower since "
        f"{pending.since.astimezone(UTC).strftime('%H:%M:%SZ')})",
        pending,
    )


# --- pod-deletion-cost ----------------------------------------------------------------------


def deletion_cost(reading: WorkerReading, jobs_per_worker: int) -> int:
    """Idle pods cost least, so the ReplicaSet removes them first; unknown pods count as full."""
    return reading.counted_jobs(jobs_per_worker) * DELETION_COST_PER_JOB


def deletion_cost_updates(
    readings: Iterable[WorkerReading],
    current_annotations: Mapping[str, Mapping[str, str]],
    jobs_per_worker: int,
) -> dict[str, int]:
    """Pods whose deletion cost must change, with the new cost (unchanged pods are left out).

    Starting pods are never stamped: the annotation marks a pod that has reported (see
    WorkerPod.reported_before), and a stamped pod that is still booting would count as full."""
    updates: dict[str, int] = {}
    for reading in readings:
        if reading.state is WorkerState.STARTING:
            continue
        cost = deletion_cost(reading, jobs_per_worker)
        annotations = current_annotations.get(reading.pod, {})
        if annotations.get(DELETION_COST_ANNOTATION) != str(cost):
            updates[reading.pod] = cost
    return updates


def deletion_cost_patch(cost: int) -> dict[str, Any]:
    return {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}}


# --- HPA mode -------------------------------------------------------------------------------


def render_hpa(
    *,
    name: str,
    namespace: str,
    deployment_name: str,
    policy: ScalingPolicy,
    labels: Mapping[str, str] | None = None,
    owner_references: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An autoscaling/v2 HPA on the workers' load metric (needs a custom-metrics adapter).

    The HPA keeps average `voicefleet_load` at targetLoad; it has no notion of spare jobs, so the
    headroom is 1 - targetLoad of every worker. The HPA cannot scale to zero (minReplicas >= 1).
    """
    target_milli = int(min(_exact(policy.target_load), _exact(policy.load_threshold)) * 1000)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    if owner_references:
        metadata["ownerReferences"] = owner_references
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name,
            },
            "minReplicas": max(1, policy.min_replicas),
            "maxReplicas": max(1, policy.max_replicas),
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": LOAD_METRIC},
                        "target": {"type": "AverageValue", "averageValue": f"{target_milli}m"},
                    },
                }
            ],
            "behavior": {
                # Calls arrive faster than pods start: grow at once, shrink after the delay.
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": int(policy.scale_down_delay_seconds),
                    "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}],
                },
            },
        },
    }


# --- reading the workers --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPod:
    """What the reader needs of a worker pod."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def reported_before(self) -> bool:
        # The operator stamps a deletion cost on every pod it has read, so the annotation marks a
        # worker that was serving: if it stops answering it may hold calls.
        return DELETION_COST_ANNOTATION in self.annotations

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> WorkerPod:
        """From a Pod as a JSON dict (kopf, or the kubernetes client's sanitised objects)."""
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return cls(
            name=str(metadata.get("name", "")),
            ip=status.get("podIP") or None,
            ready=ready,
            terminating=bool(metadata.get("deletionTimestamp")),
            annotations=dict(metadata.get("annotations") or {}),
        )


def report_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{REPORT_PATH}"


async def read_worker(
    session: aiohttp.ClientSession, pod: WorkerPod, port: int, request_seconds: float
) -> WorkerReading:
    """GET the pod's report on `port` (worker.metricsPort)."""
    try:
        if not pod.ip:
            raise ValueError("pod has no IP yet")
        request_timeout = aiohttp.ClientTimeout(total=request_seconds)
        async with session.get(report_url(pod.ip, port), timeout=request_timeout) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            report = WorkerReport.model_validate_json(await response.read())
        return WorkerReading(pod.name, WorkerState.REPORTING, report)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        # pydantic's ValidationError is a ValueError: an answer that is not a report
        detail = f"{type(error).__name__}: {error}".rstrip(": ")
        if pod.ready or pod.reported_before:
            return WorkerReading(pod.name, WorkerState.UNREACHABLE, error=detail)
        return WorkerReading(pod.name, WorkerState.STARTING, error=detail)


async def read_fleet(
    pods: Iterable[WorkerPod],
    port: int,
    *,
    request_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS,
    session: aiohttp.ClientSession | None = None,
) -> FleetLoad:
    """Read every serving pod's report at once, each with a short timeout.

    Terminating pods are left out: they drain their calls and take no new ones, so their jobs
    ask for no capacity.
    """
    serving = [pod for pod in pods if not pod.terminating]
    if session is None:
        async with aiohttp.ClientSession() as own_session:
            readings = await asyncio.gather(
                *(read_worker(own_session, pod, port, request_seconds) for pod in serving)
            )
    else:
        readings = await asyncio.gather(
            *(read_worker(session, pod, port, request_seconds) for pod in serving)
        )
    return FleetLoad(tuple(readings))
