"""The operator's own Prometheus metrics, in one registry.

`REGISTRY` is what the operator's metrics endpoint serves; every module of the operator defines
its metrics here, against that registry, so the endpoint exposes them all and tests can read
them without the process-wide default registry. Names are `voicefleet_operator_*`, labelled by
the VoiceAgent's `namespace` and `voiceagent`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

VOICEAGENT_LABELS = ("namespace", "voiceagent")

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

_PER_VOICEAGENT = (
    DESIRED_REPLICAS,
    OBSERVED_ACTIVE_JOBS,
    OBSERVED_LOAD,
    UNREACHABLE_WORKERS,
    WORKER_READ_SECONDS,
)


def forget_voiceagent(namespace: str, name: str) -> None:
    """Drop a deleted VoiceAgent's gauges, which would otherwise report it forever (counters
    stay: a total that stops growing is still true)."""
    for metric in _PER_VOICEAGENT:
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
