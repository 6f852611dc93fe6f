"""Status maths: conditions, the Ready summary and the phase, as pure functions.

Everything that writes a VoiceAgent's status (the reconcile, the Deployment watcher and, later,
telephony and scaling) describes what it observed as `ConditionUpdate`s and fields, and
`next_status` merges that into the current status:

- conditions have the metav1.Condition shape; `lastTransitionTime` changes only when a
  condition's status changes, never on a new reason or message;
- `Ready` is derived, never set directly: True when every gate is True. ConfigValid, Reconciled
  and WorkersAvailable are required gates; TelephonyReady gates Ready only while it is present
  (it exists only for VoiceAgents with numbers); ScalingActive is informational;
- the phase summarises conditions and the Deployment's rollout state;
- the result is the API's `VoiceAgentStatus` (api.py, the one definition of the status' shape,
  condition types and phases): a field of the wrong name or type fails here, in the operator's
  own tests, never as a status the API server prunes or refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from voicefleet_operator.api import (
    CONDITION_CONFIG_VALID,
    CONDITION_READY,
    CONDITION_RECONCILED,
    CONDITION_TELEPHONY_READY,
    CONDITION_TYPES,
    CONDITION_WORKERS_AVAILABLE,
    ConditionStatus,
    Phase,
    VoiceAgentStatus,
)

REQUIRED_GATES = (CONDITION_CONFIG_VALID, CONDITION_RECONCILED, CONDITION_WORKERS_AVAILABLE)
OPTIONAL_GATES = (CONDITION_TELEPHONY_READY,)
CONDITION_ORDER = CONDITION_TYPES


def now_rfc3339() -> str:
    """metav1.Time: RFC 3339 in UTC, second precision."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ConditionUpdate:
    """What one observer says about one condition; status None removes the condition."""

    type: str
    status: ConditionStatus | None
    reason: str = ""
    message: str = ""

    @classmethod
    def true(cls, type: str, reason: str, message: str = "") -> ConditionUpdate:
        return cls(type, "True", reason, message)

    @classmethod
    def false(cls, type: str, reason: str, message: str = "") -> ConditionUpdate:
        return cls(type, "False", reason, message)

    @classmethod
    def remove(cls, type: str) -> ConditionUpdate:
        return cls(type, None)


def find_condition(conditions: Iterable[Mapping[str, Any]], type: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type), None)


def is_true(conditions: Iterable[Mapping[str, Any]], type: str) -> bool:
    condition = find_condition(conditions, type)
    return condition is not None and condition.get("status") == "True"


def is_false(conditions: Iterable[Mapping[str, Any]], type: str) -> bool:
    condition = find_condition(conditions, type)
    return condition is not None and condition.get("status") == "False"


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    update: ConditionUpdate,
    *,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """The conditions with `update` merged in (kept in a stable order)."""
    by_type = {str(c["type"]): dict(c) for c in conditions}
    if update.status is None:
        by_type.pop(update.type, None)
    else:
        previous = by_type.get(update.type)
        changed = previous is None or previous.get("status") != update.status
        condition: dict[str, Any] = {
            "type": update.type,
            "status": update.status,
            "reason": update.reason or update.status,
            "message": update.message,
            "lastTransitionTime": (
                now if changed or previous is None else previous.get("lastTransitionTime", now)
            ),
        }
        if generation is None and previous is not None:
            generation = previous.get("observedGeneration")
        if generation is not None:
            condition["observedGeneration"] = generation
        by_type[update.type] = condition
    known = [by_type.pop(t) for t in CONDITION_ORDER if t in by_type]
    return known + [by_type[t] for t in sorted(by_type)]


# --- the worker Deployment -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadFacts:
    """What the status needs from the worker Deployment."""

    exists: bool
    desired: int = 0
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    rolling_out: bool = False
    """A new pod template (or spec) is being rolled out."""
    stalled: bool = False
    """The rollout exceeded progressDeadlineSeconds."""

    @classmethod
    def absent(cls) -> WorkloadFacts:
        return cls(exists=False)

    @classmethod
    def from_deployment(cls, deployment: Mapping[str, Any] | None) -> WorkloadFacts:
        if deployment is None or deployment.get("metadata", {}).get("deletionTimestamp"):
            return cls.absent()
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        desired = int(spec.get("replicas", 1))
        progressing = find_condition(status.get("conditions") or [], "Progressing")
        generation = deployment.get("metadata", {}).get("generation", 0)
        observed = status.get("observedGeneration", 0)
        replicas = int(status.get("replicas", 0))
        updated = int(status.get("updatedReplicas", 0))
        available = int(status.get("availableReplicas", 0))
        # As `kubectl rollout status`: done when the controller saw the latest spec, every
        # replica runs the new template and old ones are gone.
        rolling_out = (
            observed < generation
            or updated < desired
            or replicas > updated
            or (available < updated and _rollout_reason(progressing) != "NewReplicaSetAvailable")
        )
        stalled = bool(
            progressing
            and progressing.get("status") == "False"
            and progressing.get("reason") == "ProgressDeadlineExceeded"
        )
        return cls(
            exists=True,
            desired=desired,
            replicas=replicas,
            ready=int(status.get("readyReplicas", 0)),
            updated=updated,
            available=available,
            rolling_out=rolling_out,
            stalled=stalled,
        )


def _rollout_reason(progressing: Mapping[str, Any] | None) -> str:
    return str(progressing.get("reason", "")) if progressing else ""


def workers_condition(facts: WorkloadFacts) -> ConditionUpdate:
    """WorkersAvailable: are there as many ready workers as the Deployment asks for?"""
    if not facts.exists:
        return ConditionUpdate.false(
            CONDITION_WORKERS_AVAILABLE, "NoDeployment", "the worker Deployment does not exist yet"
        )
    if facts.desired == 0:
        return ConditionUpdate.true(
            CONDITION_WORKERS_AVAILABLE,
            "ScaledToZero",
            "asleep: no worker runs (scaled to zero); with scaling.minReplicas 0 a call wakes "
            "the fleet (the operator holds the caller while the first worker starts, then "
            "hands the call over); a pin of scaling.replicas 0 takes no calls",
        )
    counts = f"{facts.ready}/{facts.desired} workers ready"
    if facts.ready >= facts.desired:
        return ConditionUpdate.true(CONDITION_WORKERS_AVAILABLE, "WorkersReady", counts)
    if facts.stalled:
        return ConditionUpdate.false(
            CONDITION_WORKERS_AVAILABLE,
            "RolloutStalled",
            f"{counts}; the rollout exceeded its progress deadline "
            "(check the pods' events: image pull, scheduling, crash loop)",
        )
    reason = "WorkersStarting" if facts.rolling_out else "WorkersUnavailable"
    return ConditionUpdate.false(CONDITION_WORKERS_AVAILABLE, reason, counts)


# --- Ready and phase -------------------------------------------------------------------------


def ready_condition(conditions: Iterable[Mapping[str, Any]]) -> ConditionUpdate:
    """Ready: True when every required gate, and every optional gate present, is True."""
    conditions = list(conditions)
    gates = [(g, True) for g in REQUIRED_GATES] + [(g, False) for g in OPTIONAL_GATES]
    for gate, required in gates:
        condition = find_condition(conditions, gate)
        if condition is None:
            if required:
                return ConditionUpdate(
                    CONDITION_READY, "Unknown", "Pending", f"{gate} is not known yet"
                )
            continue
        if condition.get("status") != "True":
            status: ConditionStatus = "Unknown" if condition.get("status") == "Unknown" else "False"
            message = f"{gate}: {condition.get('message') or condition.get('reason')}"
            return ConditionUpdate(CONDITION_READY, status, str(condition.get("reason")), message)
    workers = find_condition(conditions, CONDITION_WORKERS_AVAILABLE) or {}
    if workers.get("reason") == "ScaledToZero":
        # Not "workers take calls": none runs; the operator's standby wakes the fleet (wake.py).
        return ConditionUpdate.true(CONDITION_READY, "Asleep", str(workers.get("message")))
    return ConditionUpdate.true(CONDITION_READY, "Ready", "the agent's workers take calls")


def phase_for(conditions: Iterable[Mapping[str, Any]], facts: WorkloadFacts | None) -> Phase:
    """One word for `kubectl get`: Pending, Progressing, Ready, Degraded or Failed.

    `facts` None means the Deployment was not looked at in this update; the phase then rests on
    the conditions alone.
    """
    conditions = list(conditions)
    running = facts.exists if facts is not None else is_true(conditions, CONDITION_RECONCILED)
    if is_false(conditions, CONDITION_CONFIG_VALID):
        # The last good workers keep serving; without any, nothing can until the spec is fixed.
        return "Degraded" if running else "Failed"
    if is_false(conditions, CONDITION_RECONCILED):
        return "Degraded" if running else "Pending"
    if is_true(conditions, CONDITION_READY):
        return "Ready"
    if facts is None:
        return "Progressing" if running else "Pending"
    if not facts.exists:
        return "Pending"
    if facts.stalled:
        return "Degraded"
    if facts.rolling_out:
        return "Progressing"
    if facts.ready < facts.desired:
        return "Degraded"
    # Workers are fine, so another gate (e.g. TelephonyReady) holds Ready back.
    return "Degraded" if any(is_false(conditions, g) for g in OPTIONAL_GATES) else "Progressing"


def next_status(
    current: Mapping[str, Any] | None,
    *,
    generation: int | None,
    updates: Iterable[ConditionUpdate] = (),
    facts: WorkloadFacts | None = None,
    fields: VoiceAgentStatus | None = None,
    observed_generation: int | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The new status: `current` with the updates, the workload facts and fields merged in.

    `fields`: the API's status model with the fields this writer sets (those given when it was
    made, `model_fields_set`); one given as None is removed. Conditions and the phase are not
    fields: conditions are `updates`, and Ready and the phase are recomputed from the result.
    """
    given = _given_fields(fields)
    now = now or now_rfc3339()
    status: dict[str, Any] = dict(current or {})
    if generation is None:
        # Observers that did not read the spec speak for the generation last reconciled.
        generation = status.get("observedGeneration")
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    all_updates = list(updates)
    if facts is not None:
        all_updates.append(workers_condition(facts))
        status["replicas"] = facts.replicas if facts.exists else 0
        status["readyReplicas"] = facts.ready if facts.exists else 0
    for update in all_updates:
        conditions = set_condition(conditions, update, generation=generation, now=now)
    conditions = set_condition(
        conditions, ready_condition(conditions), generation=generation, now=now
    )
    status["conditions"] = conditions
    status["phase"] = phase_for(conditions, facts)
    if observed_generation is not None:
        status["observedGeneration"] = observed_generation
    for key, value in given.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return typed(status)


def _given_fields(fields: VoiceAgentStatus | None) -> dict[str, Any]:
    """{wire name: value} of the fields `fields` was given (None included: a removal)."""
    if fields is None:
        return {}
    derived = fields.model_fields_set & {"conditions", "phase"}
    if derived:
        raise ValueError(
            f"status fields {sorted(derived)} are not set directly: conditions are updates, "
            "and the phase is derived from them"
        )
    return fields.model_dump(mode="json", by_alias=True, include=fields.model_fields_set)


def typed(status: Mapping[str, Any]) -> dict[str, Any]:
    """`status` as the API's VoiceAgentStatus admits it, in its wire form (raises
    pydantic.ValidationError naming the field that does not fit)."""
    model = VoiceAgentStatus.model_validate(dict(status))
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    return dict(old or {}) != dict(new)


def transitions(
    old: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> list[tuple[str, str, str]]:
    """(type, new status, reason) of conditions whose status changed: what deserves an Event."""
    old_conditions = list((old or {}).get("conditions") or [])
    changed = []
    for condition in new.get("conditions") or []:
        before = find_condition(old_conditions, condition["type"])
        if before is None or before.get("status") != condition["status"]:
            changed.append((condition["type"], condition["status"], condition["reason"]))
    return changed
