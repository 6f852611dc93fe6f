"""The operator's own Prometheus metrics, in one registry.

`REGISTRY` is what the operator's metrics endpoint serves; every module of the operator defines
its metrics here, against that registry, so the endpoint exposes them all and tests can read
them without the process-wide default registry. Names are `voicefleet_operator_*`, labelled like the
runtime's series: `tenant` (the VoiceAgent's namespace) and `agent` (its name), so the two join
in one query. (Not `namespace`: Prometheus sets that target label to the operator pod's own
namespace, and the scraped label would be renamed to `exported_namespace`.)

What sets them: the reconcile (`observe_reconcile`, `RECONCILE_ERRORS`), every status write
(`observe_status`: phase, conditions and replicas as the VoiceAgent's status says), the
autoscaler (`SCALING_*`, observed load) and the telephony step (`TELEPHONY_ERRORS`).
Phase and conditions are exported kube-state-metrics style, one series per possible value with
1 for the current one, so `sum by (phase)` counts VoiceAgents and a missing series means the
operator has not seen the VoiceAgent (never that it is fine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voicefleet_operator.api import ConditionStatus, Phase

REGISTRY = CollectorRegistry(auto_describe=True)

VOICEAGENT_LABELS = ("tenant", "agent")

# --- autoscaler -----------------------------------------------------------------------------

SCALING_DECISIONS = Counter(
    "voicefleet_operator_scaling_decisions_total",
    "Autoscaler evaluations, by outcome (ScaleUp, ScaleDown, AboveMaximum, ScaleDownPending, "
    "Steady, Pinned).",
    (*VOICEAGENT_LABELS, "reason"),
    registry=REGISTRY,
)
SCALING_CHANGES = Counter(
    "voicefleet_operator_scaling_changes_total",
    "Changes of a worker Deployment's replicas made by the autoscaler, by direction (up, down).",
    (*VOICEAGENT_LABELS, "direction"),
    registry=REGISTRY,
)
SCALING_ERRORS = Counter(
    "voicefleet_operator_scaling_errors_total",
    "Autoscaler evaluations that failed (API errors); the next evaluation tries again.",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
DESIRED_REPLICAS = Gauge(
    "voicefleet_operator_desired_replicas",
    "Worker replicas the autoscaler (or the pin) asks for.",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
OBSERVED_ACTIVE_JOBS = Gauge(
    "voicefleet_operator_observed_active_jobs",
    "Active jobs the autoscaler counted (an unreachable worker counts as full).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
OBSERVED_LOAD = Gauge(
    "voicefleet_operator_observed_load",
    "Average worker load the autoscaler computed (active jobs / capacity of counted workers).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
UNSCHEDULABLE_WORKERS = Gauge(
    "voicefleet_operator_unschedulable_workers",
    "Worker pods the scheduler cannot place (PodScheduled=False, Unschedulable): wanted "
    "capacity that does not exist (VoiceAgent condition CapacityLimited=PodsUnschedulable).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
WAKES = Counter(
    "voicefleet_operator_wakes_total",
    "Callers of a VoiceAgent scaled to zero that the operator's standby held while the fleet "
    "woke (wake.py), by result: handed_over (to the first worker), timed_out (the treatment "
    "without a worker: 486 or the voicefleet.overflow attribute), unschedulable (the same "
    "treatment at once: every worker pod is unschedulable), caller_left.",
    (*VOICEAGENT_LABELS, "result"),
    registry=REGISTRY,
)
WAKE_SECONDS = Histogram(
    "voicefleet_operator_wake_seconds",
    "From the standby taking a sleeping fleet's call to handing it over to the first worker.",
    VOICEAGENT_LABELS,
    buckets=(1, 2, 5, 10, 15, 20, 25, 30, 60),
    registry=REGISTRY,
)
UNREACHABLE_WORKERS = Gauge(
    "voicefleet_operator_unreachable_workers",
    "Ready worker pods whose /worker endpoint did not answer (counted as full).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
WORKER_READ_SECONDS = Histogram(
    "voicefleet_operator_worker_read_seconds",
    "Time to read every worker's /worker endpoint of one VoiceAgent.",
    VOICEAGENT_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)


# --- reconcile ------------------------------------------------------------------------------

RECONCILES = Counter(
    "voicefleet_operator_reconciles_total",
    "Reconciles of a VoiceAgent, by result: Applied, a configuration problem (InvalidSpec, "
    "SecretNotFound, ...), a failure (ApiError, ApplyFailed, NameConflict, "
    "LiveKitSecretMissing, Exception) or Gone.",
    (*VOICEAGENT_LABELS, "result"),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "voicefleet_operator_reconcile_errors_total",
    "Reconciles that could not apply the children for a reason on the platform's side (API "
    "errors, a missing platform Secret, name conflicts, exceptions), by reason. A tenant's "
    "invalid configuration is not counted here (see ConfigValid).",
    (*VOICEAGENT_LABELS, "reason"),
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "voicefleet_operator_reconcile_duration_seconds",
    "Time one reconcile took (reads, validation, server-side apply, status), per tenant.",
    ("tenant",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)

# --- status ---------------------------------------------------------------------------------

# One series per value the API allows (api.py defines them once).
PHASES: tuple[str, ...] = get_args(Phase)
CONDITION_STATUSES: tuple[str, ...] = get_args(ConditionStatus)

VOICEAGENT_PHASE = Gauge(
    "voicefleet_operator_voiceagent_phase",
    "1 for the VoiceAgent's current status.phase, 0 for the other phases.",
    (*VOICEAGENT_LABELS, "phase"),
    registry=REGISTRY,
)
VOICEAGENT_CONDITION = Gauge(
    "voicefleet_operator_voiceagent_condition",
    "1 for the current status of each condition in the VoiceAgent's status (Ready, ConfigValid, "
    "Reconciled, WorkersAvailable, TelephonyReady, ScalingActive), 0 for the other statuses.",
    (*VOICEAGENT_LABELS, "condition", "status"),
    registry=REGISTRY,
)
WORKER_REPLICAS = Gauge(
    "voicefleet_operator_worker_replicas",
    "Worker pods of the VoiceAgent's Deployment (status.replicas).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)
WORKER_READY_REPLICAS = Gauge(
    "voicefleet_operator_worker_ready_replicas",
    "Ready worker pods of the VoiceAgent's Deployment (status.readyReplicas).",
    VOICEAGENT_LABELS,
    registry=REGISTRY,
)

# --- telephony ------------------------------------------------------------------------------

TELEPHONY_ERRORS = Counter(
    "voicefleet_operator_telephony_errors_total",
    "Failed provisioning steps of a VoiceAgent's SIP trunk and dispatch rule, by reason "
    "(LiveKitError, AuthSecretInvalid); each is retried with backoff.",
    (*VOICEAGENT_LABELS, "reason"),
    registry=REGISTRY,
)

_PER_VOICEAGENT = (
    DESIRED_REPLICAS,
    OBSERVED_ACTIVE_JOBS,
    OBSERVED_LOAD,
    UNREACHABLE_WORKERS,
    UNSCHEDULABLE_WORKERS,
    WORKER_READ_SECONDS,
    WORKER_REPLICAS,
    WORKER_READY_REPLICAS,
)

# Condition types last exported per VoiceAgent: a condition removed from the status (e.g.
# TelephonyReady once the numbers are gone) must lose its series too.
_exported_conditions: dict[tuple[str, str], set[str]] = {}


class _HasReason(Protocol):
    @property
    def reason(self) -> str: ...


OutcomeT = TypeVar("OutcomeT", bound=_HasReason)


@dataclass
class ReconcileRecord:
    """What `observe_reconcile` counts: set by `done()`, "Exception" if the block raised."""

    result: str = "Unknown"

    def done(self, outcome: OutcomeT) -> OutcomeT:
        self.result = outcome.reason or "Unknown"
        return outcome


@contextmanager
def observe_reconcile(namespace: str, name: str) -> Iterator[ReconcileRecord]:
    """Time one reconcile and count it by result (an exception counts as an error too)."""
    record = ReconcileRecord()
    started = time.perf_counter()
    try:
        yield record
    except Exception:
        record.result = "Exception"
        RECONCILE_ERRORS.labels(namespace, name, "Exception").inc()
        raise
    finally:
        RECONCILE_DURATION.labels(namespace).observe(time.perf_counter() - started)
        RECONCILES.labels(namespace, name, record.result).inc()


def observe_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """Export a VoiceAgent's phase, conditions and replicas as its status now says."""
    phase = status.get("phase")
    for candidate in PHASES:
        VOICEAGENT_PHASE.labels(namespace, name, candidate).set(1 if candidate == phase else 0)
    current: set[str] = set()
    for condition in status.get("conditions") or []:
        kind = str(condition.get("type"))
        current.add(kind)
        for value in CONDITION_STATUSES:
            series = VOICEAGENT_CONDITION.labels(namespace, name, kind, value)
            series.set(1 if condition.get("status") == value else 0)
    key = (namespace, name)
    for kind in _exported_conditions.get(key, set()) - current:
        _remove_condition(namespace, name, kind)
    _exported_conditions[key] = current
    if "replicas" in status:
        WORKER_REPLICAS.labels(namespace, name).set(float(status["replicas"]))
    if "readyReplicas" in status:
        WORKER_READY_REPLICAS.labels(namespace, name).set(float(status["readyReplicas"]))


def _remove_condition(namespace: str, name: str, kind: str) -> None:
    for value in CONDITION_STATUSES:
        try:
            VOICEAGENT_CONDITION.remove(namespace, name, kind, value)
        except KeyError:
            pass


def forget_voiceagent(namespace: str, name: str) -> None:
    """Drop a deleted VoiceAgent's gauges, which would otherwise report it forever (counters
    stay: a total that stops growing is still true)."""
    for metric in _PER_VOICEAGENT:
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
    for phase in PHASES:
        try:
            VOICEAGENT_PHASE.remove(namespace, name, phase)
        except KeyError:
            pass
    for kind in _exported_conditions.pop((namespace, name), set()):
        _remove_condition(namespace, name, kind)
