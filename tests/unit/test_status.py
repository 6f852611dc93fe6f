"""Status maths: condition merging, the Ready summary, the phase, and what deserves an Event."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator import handlers, reporting
from voicefleet_operator.api import VoiceAgentStatus, parse_spec
from voicefleet_operator.status import (
    CONDITION_RECONCILED,
    ConditionUpdate,
    WorkloadFacts,
    find_condition,
    next_status,
    now_rfc3339,
    phase_for,
    ready_condition,
    set_condition,
    status_changed,
    transitions,
    workers_condition,
)

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:01:00Z"
T2 = "2025-01-01T00:02:00Z"

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def deployment(
    *,
    desired: int = 2,
    replicas: int = 2,
    ready: int = 2,
    updated: int = 2,
    available: int | None = None,
    generation: int = 1,
    observed: int = 1,
    progressing: tuple[str, str] | None = ("True", "NewReplicaSetAvailable"),
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "availableReplicas": ready if available is None else available,
    }
    if progressing:
        status["conditions"] = [
            {"type": "Progressing", "status": progressing[0], "reason": progressing[1]}
        ]
    return {
        "metadata": {"name": "x", "generation": generation},
        "spec": {"replicas": desired},
        "status": status,
    }


# --- conditions ----------------------------------------------------------------------------


def test_transition_time_changes_only_when_the_status_changes() -> None:
    first = set_condition(
        [], ConditionUpdate.false("ConfigValid", "SecretNotFound", "a"), generation=1, now=T0
    )
    assert first[0]["lastTransitionTime"] == T0
    reworded = set_condition(
        first, ConditionUpdate.false("ConfigValid", "SecretKeyNotFound", "b"), generation=2, now=T1
    )
    assert reworded[0]["lastTransitionTime"] == T0  # same status: time kept
    assert reworded[0]["reason"] == "SecretKeyNotFound"
    assert reworded[0]["message"] == "b"
    assert reworded[0]["observedGeneration"] == 2
    flipped = set_condition(
        reworded, ConditionUpdate.true("ConfigValid", "Valid", "ok"), generation=2, now=T2
    )
    assert flipped[0]["lastTransitionTime"] == T2


def test_conditions_have_the_metav1_condition_shape_and_a_stable_order() -> None:
    conditions: list[dict[str, Any]] = []
    for update in (
        ConditionUpdate.true("ScalingActive", "Steady"),
        ConditionUpdate.true("WorkersAvailable", "WorkersReady", "2/2 workers ready"),
        ConditionUpdate.true("ConfigValid", "Valid"),
        ConditionUpdate.true("Custom", "Whatever"),
    ):
        conditions = set_condition(conditions, update, generation=3, now=T0)
    assert [c["type"] for c in conditions] == [
        "ConfigValid",
        "WorkersAvailable",
        "ScalingActive",
        "Custom",
    ]
    status = VoiceAgentStatus.model_validate({"conditions": conditions})  # the CRD's own model
    assert status.conditions[0].observed_generation == 3


def test_a_condition_can_be_removed() -> None:
    conditions = set_condition(
        [], ConditionUpdate.true("TelephonyReady", "Provisioned"), generation=1, now=T0
    )
    assert (
        set_condition(conditions, ConditionUpdate.remove("TelephonyReady"), generation=1, now=T1)
        == []
    )


def all_true(*extra: ConditionUpdate) -> list[dict[str, Any]]:
    conditions: list[dict[str, Any]] = []
    for update in (
        ConditionUpdate.true("ConfigValid", "Valid"),
        ConditionUpdate.true(CONDITION_RECONCILED, "Applied"),
        ConditionUpdate.true("WorkersAvailable", "WorkersReady"),
        *extra,
    ):
        conditions = set_condition(conditions, update, generation=1, now=T0)
    return conditions


def test_ready_needs_every_required_gate() -> None:
    assert ready_condition(all_true()).status == "True"
    missing = [c for c in all_true() if c["type"] != "WorkersAvailable"]
    assert ready_condition(missing).status == "Unknown"
    broken = all_true(
        ConditionUpdate.false("ConfigValid", "SecretNotFound", "spec.secretRefs[0].name: ...")
    )
    ready = ready_condition(broken)
    assert (ready.status, ready.reason) == ("False", "SecretNotFound")
    assert ready.message.startswith("ConfigValid: spec.secretRefs[0].name")


def test_telephony_gates_ready_only_while_present_and_scaling_never_does() -> None:
    assert (
        ready_condition(all_true(ConditionUpdate.false("ScalingActive", "Pinned"))).status == "True"
    )
    held = ready_condition(
        all_true(ConditionUpdate.false("TelephonyReady", "NumberConflict", "+1555"))
    )
    assert (held.status, held.reason) == ("False", "NumberConflict")
    assert (
        ready_condition(all_true(ConditionUpdate.true("TelephonyReady", "Provisioned"))).status
        == "True"
    )


# --- the Deployment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "rolling_out", "stalled"),
    [
        (deployment(), False, False),
        # just created: the controller has not seen it yet
        (deployment(replicas=0, ready=0, updated=0, observed=0, progressing=None), True, False),
        # new pods starting, none ready
        (deployment(ready=0, progressing=("True", "ReplicaSetUpdated")), True, False),
        # surge: a third pod with the new template while two old ones serve
        (deployment(replicas=3, updated=1, progressing=("True", "ReplicaSetUpdated")), True, False),
        # every replica runs the new template, but an old pod lingers (being scaled down)
        (deployment(replicas=3, updated=2, progressing=("True", "ReplicaSetUpdated")), True, False),
        # rollout done, then a pod died: not a rollout
        (deployment(ready=1, available=1), False, False),
        (deployment(ready=0, progressing=("False", "ProgressDeadlineExceeded")), True, True),
    ],
)
def test_workload_facts_from_a_deployment(
    body: dict[str, Any], rolling_out: bool, stalled: bool
) -> None:
    facts = WorkloadFacts.from_deployment(body)
    assert facts.exists
    assert (facts.rolling_out, facts.stalled) == (rolling_out, stalled)


def test_a_deleted_or_missing_deployment_is_absent() -> None:
    assert not WorkloadFacts.from_deployment(None).exists
    terminating = deployment()
    terminating["metadata"]["deletionTimestamp"] = T0
    assert not WorkloadFacts.from_deployment(terminating).exists


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (deployment(), "True", "WorkersReady"),
        (
            deployment(ready=0, progressing=("True", "ReplicaSetUpdated")),
            "False",
            "WorkersStarting",
        ),
        (deployment(ready=1, available=1), "False", "WorkersUnavailable"),
        (
            deployment(ready=0, progressing=("False", "ProgressDeadlineExceeded")),
            "False",
            "RolloutStalled",
        ),
        (deployment(desired=0, replicas=0, ready=0, updated=0), "True", "ScaledToZero"),
        (None, "False", "NoDeployment"),
    ],
)
def test_workers_available(body: dict[str, Any] | None, status: str, reason: str) -> None:
    update = workers_condition(WorkloadFacts.from_deployment(body))
    assert (update.status, update.reason) == (status, reason)


# --- phase ---------------------------------------------------------------------------------


def conditions_with(*updates: ConditionUpdate) -> list[dict[str, Any]]:
    conditions: list[dict[str, Any]] = []
    for update in updates:
        conditions = set_condition(conditions, update, generation=1, now=T0)
    return set_condition(conditions, ready_condition(conditions), generation=1, now=T0)


VALID = ConditionUpdate.true("ConfigValid", "Valid")
INVALID = ConditionUpdate.false("ConfigValid", "SecretNotFound")
APPLIED = ConditionUpdate.true(CONDITION_RECONCILED, "Applied")
NOT_APPLIED = ConditionUpdate.false(CONDITION_RECONCILED, "ApplyFailed")


@pytest.mark.parametrize(
    ("updates", "body", "phase"),
    [
        # a bad spec before anything ran: nothing can serve
        ((INVALID,), None, "Failed"),
        # a bad update while the last good workers serve: they keep serving
        ((INVALID, APPLIED), deployment(), "Degraded"),
        ((VALID, NOT_APPLIED), None, "Pending"),
        ((VALID, NOT_APPLIED), deployment(), "Degraded"),
        (
            (VALID, APPLIED),
            deployment(ready=0, replicas=0, updated=0, observed=0, progressing=None),
            "Progressing",
        ),
        (
            (VALID, APPLIED),
            deployment(replicas=3, updated=1, progressing=("True", "ReplicaSetUpdated")),
            "Ready",
        ),
        ((VALID, APPLIED), deployment(), "Ready"),
        ((VALID, APPLIED), deployment(ready=1, available=1), "Degraded"),
        (
            (VALID, APPLIED),
            deployment(ready=0, progressing=("False", "ProgressDeadlineExceeded")),
            "Degraded",
        ),
        (
            (VALID, APPLIED, ConditionUpdate.false("TelephonyReady", "NumberConflict")),
            deployment(),
            "Degraded",
        ),
    ],
)
def test_phase(
    updates: tuple[ConditionUpdate, ...], body: dict[str, Any] | None, phase: str
) -> None:
    facts = WorkloadFacts.from_deployment(body)
    conditions = conditions_with(*updates, workers_condition(facts))
    assert phase_for(conditions, facts) == phase


def test_next_status_merges_and_recomputes_ready_and_phase() -> None:
    first = next_status(
        None,
        generation=1,
        updates=[VALID, APPLIED],
        facts=WorkloadFacts.from_deployment(
            deployment(ready=0, progressing=("True", "ReplicaSetUpdated"))
        ),
        fields=VoiceAgentStatus(dispatch_name="acme.support", config_hash="abc"),
        observed_generation=1,
        now=T0,
    )
    assert first["phase"] == "Progressing"
    assert (first["replicas"], first["readyReplicas"]) == (2, 0)
    assert find_condition(first["conditions"], "Ready")["status"] == "False"  # type: ignore[index]
    second = next_status(
        first, generation=None, facts=WorkloadFacts.from_deployment(deployment()), now=T1
    )
    ready = find_condition(second["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True" and ready["lastTransitionTime"] == T1
    assert second["phase"] == "Ready"
    assert second["dispatchName"] == "acme.support"  # fields from other writers are kept
    config_valid = find_condition(second["conditions"], "ConfigValid")
    assert config_valid is not None and config_valid["lastTransitionTime"] == T0
    assert transitions(first, second) == [
        ("Ready", "True", "Ready"),
        ("WorkersAvailable", "True", "WorkersReady"),
    ]
    third = next_status(second, generation=1, fields=VoiceAgentStatus(config_hash=None), now=T2)
    assert "configHash" not in third
    assert third["conditions"] == second["conditions"]  # nothing changed: times kept
    VoiceAgentStatus.model_validate(third)


# --- events and handler-side pure helpers ------------------------------------------------


def test_events_only_for_what_a_tenant_must_see() -> None:
    ready = next_status(
        None,
        generation=1,
        updates=[VALID, APPLIED],
        facts=WorkloadFacts.from_deployment(deployment()),
        now=T0,
    )
    assert reporting.condition_events({}, ready) == [
        ("Normal", "Ready", "the agent's workers take calls")
    ]
    assert reporting.condition_events(ready, ready) == []  # a resync with no change is silent
    broken = next_status(
        ready,
        generation=2,
        updates=[
            ConditionUpdate.false("ConfigValid", "SecretNotFound", "spec.secretRefs[0].name: gone")
        ],
        now=T1,
    )
    events = reporting.condition_events(ready, broken)
    assert ("Warning", "SecretNotFound", "spec.secretRefs[0].name: gone") in events
    reworded = next_status(
        broken,
        generation=2,
        updates=[ConditionUpdate.false("ConfigValid", "SecretKeyNotFound", "other problem")],
        now=T2,
    )
    assert reporting.condition_events(broken, reworded) == [
        ("Warning", "SecretKeyNotFound", "other problem")
    ]
    healed = next_status(reworded, generation=3, updates=[VALID], now=T2)
    assert (
        "Normal",
        "ConfigValid",
        "the configuration is valid again",
    ) in reporting.condition_events(reworded, healed)
    lost = next_status(
        ready,
        generation=1,
        facts=WorkloadFacts.from_deployment(deployment(ready=1, available=1)),
        now=T1,
    )
    assert ("Warning", "WorkersUnavailable", "1/2 workers ready") in reporting.condition_events(
        ready, lost
    )


def example_spec() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text())["spec"])


def test_replicas_keep_the_current_value_within_bounds() -> None:
    spec = parse_spec(example_spec())  # min 1, max 10, 10 jobs per worker at 0.7, 2 spare
    assert handlers.replicas_for(spec, None) == 1
    assert handlers.replicas_for(spec, {"spec": {"replicas": 4}}) == 4
    assert handlers.replicas_for(spec, {"spec": {"replicas": 40}}) == 10
    assert handlers.replicas_for(spec, {"spec": {"replicas": 0}}) == 1
    pinned = example_spec()
    pinned["scaling"]["replicas"] = 3
    assert handlers.replicas_for(parse_spec(pinned), {"spec": {"replicas": 4}}) == 3
    spare = example_spec()
    spare["scaling"]["spareJobs"] = 15  # 15 free slots at 7 planned jobs per worker
    assert handlers.replicas_for(parse_spec(spare), None) == 3


def test_validate_spec_names_the_field() -> None:
    body = {
        "metadata": {"name": "acme-support", "namespace": "acme", "uid": "u"},
        "spec": example_spec(),
    }
    spec, problems = handlers.validate_spec(body)
    assert spec is not None and problems == []
    bad = copy.deepcopy(body)
    bad["spec"]["entry"] = "nobody"
    spec, problems = handlers.validate_spec(bad)
    assert spec is None
    assert problems[0].reason == "InvalidSpec"
    assert "spec.entry" in problems[0].message or "entry 'nobody'" in problems[0].message
    long_name = copy.deepcopy(body)
    long_name["metadata"]["name"] = "a" * 60
    _, problems = handlers.validate_spec(long_name)
    assert problems[0].reason == "InvalidName" and problems[0].message.startswith("metadata.name")


@pytest.mark.parametrize(
    ("status", "generation", "recheck"),
    [
        ({}, 1, True),  # never acted on
        ({"observedGeneration": 1, "conditions": all_true()}, 1, False),
        ({"observedGeneration": 1, "conditions": all_true()}, 2, True),  # a change kopf merged
        ({"observedGeneration": 2, "conditions": conditions_with(INVALID)}, 2, True),
        ({"observedGeneration": 2, "conditions": conditions_with(VALID, NOT_APPLIED)}, 2, True),
    ],
)
def test_recheck_while_invalid_unapplied_or_behind(
    status: dict[str, Any], generation: int, recheck: bool
) -> None:
    assert handlers._needs_recheck(status=status, meta={"generation": generation}) is recheck


def test_a_fleet_at_zero_is_ready_but_says_it_is_asleep() -> None:
    """Not "the agent's workers take calls": none runs; a call wakes the fleet (wake.py)."""
    asleep = workers_condition(
        WorkloadFacts(exists=True, desired=0, replicas=0, ready=0, updated=0, available=0)
    )
    assert (asleep.status, asleep.reason) == ("True", "ScaledToZero")
    assert "asleep" in asleep.message and "wakes" in asleep.message
    ready = ready_condition(all_true(asleep))
    assert (ready.status, ready.reason) == ("True", "Asleep")
    assert ready.message == asleep.message
    assert ready_condition(all_true()).reason == "Ready"


# --- what each field of a Deployment means (issue 18: behaviour the mutation run found unguarded)


def test_workload_facts_read_every_count_and_the_documented_defaults() -> None:
    facts = WorkloadFacts.from_deployment(deployment(desired=3, replicas=4, ready=2, updated=3))
    assert (facts.desired, facts.replicas, facts.ready, facts.updated, facts.available) == (
        3,
        4,
        2,
        3,
        2,
    )
    # A Deployment straight from the API server before its controller wrote any status: the
    # defaults are Kubernetes' own (spec.replicas 1; every count 0; generation 0).
    bare = WorkloadFacts.from_deployment({"metadata": {}, "spec": {}})
    assert (bare.desired, bare.replicas, bare.ready, bare.updated, bare.available) == (
        1,
        0,
        0,
        0,
        0,
    )
    assert bare.rolling_out  # one replica wanted, none updated
    # No metadata at all still reads (and is not "being deleted").
    assert WorkloadFacts.from_deployment({"spec": {"replicas": 0}}).exists
    assert WorkloadFacts.absent() == WorkloadFacts(exists=False)


def test_a_spec_the_controller_has_not_seen_is_a_rollout() -> None:
    # Counts all fine, but observedGeneration lags metadata.generation: the new template has not
    # been acted on yet.
    behind = deployment(generation=3, observed=2)
    assert WorkloadFacts.from_deployment(behind).rolling_out
    # Only the generation lags (the counts are those of the old ReplicaSet, all updated).
    only_generation = deployment(generation=1, observed=0)
    assert WorkloadFacts.from_deployment(only_generation).rolling_out
    done = deployment(generation=3, observed=3)
    assert not WorkloadFacts.from_deployment(done).rolling_out


def test_available_below_updated_is_a_rollout_until_the_controller_says_it_is_done() -> None:
    # Two updated pods, one available, the controller still progressing: rolling out.
    progressing = deployment(ready=1, available=1, progressing=("True", "ReplicaSetUpdated"))
    assert WorkloadFacts.from_deployment(progressing).rolling_out
    # No Progressing condition at all (e.g. progressDeadlineSeconds unset): rolling out too.
    unknown = deployment(ready=1, available=1, progressing=None)
    assert WorkloadFacts.from_deployment(unknown).rolling_out
    # All updated pods available: not a rollout whatever the condition's reason.
    steady = deployment(progressing=("True", "ReplicaSetUpdated"))
    assert not WorkloadFacts.from_deployment(steady).rolling_out
    # A Progressing condition without a reason is not the "done" reason.
    no_reason = deployment(ready=1, available=1)
    no_reason["status"]["conditions"] = [{"type": "Progressing", "status": "True"}]
    assert WorkloadFacts.from_deployment(no_reason).rolling_out


def test_workers_available_messages() -> None:
    def message(body: dict[str, Any] | None) -> tuple[str, str, str, str]:
        update = workers_condition(WorkloadFacts.from_deployment(body))
        return update.type, str(update.status), update.reason, update.message

    assert message(None) == (
        "WorkersAvailable",
        "False",
        "NoDeployment",
        "the worker Deployment does not exist yet",
    )
    assert message(deployment(desired=0, replicas=0, ready=0, updated=0)) == (
        "WorkersAvailable",
        "True",
        "ScaledToZero",
        "asleep: no worker runs (scaled to zero); with scaling.minReplicas 0 a call wakes the "
        "fleet (the operator holds the caller while the first worker starts, then hands the "
        "call over); a pin of scaling.replicas 0 takes no calls",
    )
    assert message(deployment(desired=3, ready=3)) == (
        "WorkersAvailable",
        "True",
        "WorkersReady",
        "3/3 workers ready",
    )
    assert message(deployment(ready=0, progressing=("False", "ProgressDeadlineExceeded"))) == (
        "WorkersAvailable",
        "False",
        "RolloutStalled",
        "0/2 workers ready; the rollout exceeded its progress deadline (check the pods' events: "
        "image pull, scheduling, crash loop)",
    )
    assert message(deployment(ready=1, available=1))[2:] == (
        "WorkersUnavailable",
        "1/2 workers ready",
    )


def test_ready_says_which_gate_holds_it_and_how() -> None:
    pending = ready_condition([])
    assert (pending.type, pending.status, pending.reason, pending.message) == (
        "Ready",
        "Unknown",
        "Pending",
        "ConfigValid is not known yet",
    )
    # A gate whose status is Unknown makes Ready Unknown (not False), with the gate's reason;
    # without a message the reason is repeated.
    unknown = ready_condition(
        all_true(ConditionUpdate("WorkersAvailable", "Unknown", "Probing", ""))
    )
    assert (unknown.status, unknown.reason, unknown.message) == (
        "Unknown",
        "Probing",
        "WorkersAvailable: Probing",
    )
    # An optional gate that is absent is skipped; the required ones after it are still checked.
    held = ready_condition(all_true(ConditionUpdate.false("WorkersAvailable", "Down", "0/1")))
    assert (held.status, held.reason, held.message) == ("False", "Down", "WorkersAvailable: 0/1")
    asleep = ready_condition(
        all_true(ConditionUpdate.true("WorkersAvailable", "ScaledToZero", "asleep"))
    )
    assert (asleep.type, asleep.status, asleep.reason, asleep.message) == (
        "Ready",
        "True",
        "Asleep",
        "asleep",
    )


def test_phase_without_workload_facts_rests_on_the_conditions() -> None:
    reconciled = conditions_with(
        ConditionUpdate.true("ConfigValid", "Valid"),
        ConditionUpdate.true("Reconciled", "Applied"),
        ConditionUpdate.false("WorkersAvailable", "WorkersStarting"),
    )
    assert phase_for(reconciled, None) == "Progressing"
    not_yet = conditions_with(ConditionUpdate.true("ConfigValid", "Valid"))
    assert phase_for(not_yet, None) == "Pending"
    assert phase_for(not_yet, WorkloadFacts.absent()) == "Pending"
    # Workers all ready, nothing else false: Ready is only waiting (e.g. TelephonyReady
    # Unknown), so Progressing.
    waiting = conditions_with(
        ConditionUpdate.true("ConfigValid", "Valid"),
        ConditionUpdate.true("Reconciled", "Applied"),
        ConditionUpdate("TelephonyReady", "Unknown", "Provisioning"),
    )
    facts = WorkloadFacts.from_deployment(deployment())
    assert phase_for(waiting, facts) == "Progressing"


def test_next_status_keeps_the_generation_counts_and_phase() -> None:
    first = next_status(
        None,
        generation=4,
        updates=[ConditionUpdate.true("ConfigValid", "Valid")],
        facts=WorkloadFacts.from_deployment(deployment(replicas=3, ready=1, desired=2)),
        observed_generation=4,
        now=T0,
    )
    assert (first["replicas"], first["readyReplicas"], first["observedGeneration"]) == (3, 1, 4)
    assert {c["type"]: c["observedGeneration"] for c in first["conditions"]} == {
        "Ready": 4,
        "ConfigValid": 4,
        "WorkersAvailable": 4,
    }
    # The Deployment watcher does not read the spec (generation None): it speaks for the
    # generation last reconciled, and leaves observedGeneration alone.
    gone = next_status(first, generation=None, facts=WorkloadFacts.absent(), now=T1)
    assert (gone["replicas"], gone["readyReplicas"], gone["observedGeneration"]) == (0, 0, 4)
    workers = find_condition(gone["conditions"], "WorkersAvailable")
    assert workers is not None and workers["observedGeneration"] == 4
    assert gone["phase"] == "Pending"
    # A condition set before any generation was known keeps none, and a later update without a
    # generation keeps the one it had.
    merged = set_condition(
        [{"type": "Reconciled", "status": "True", "reason": "Applied", "observedGeneration": 2}],
        ConditionUpdate.true("Reconciled", "Applied", "again"),
        generation=None,
        now=T1,
    )
    assert merged[0]["observedGeneration"] == 2
    # A condition without a recorded transition time gets `now` when it is next merged.
    untimed = set_condition(
        [{"type": "Reconciled", "status": "True", "reason": "Applied"}],
        ConditionUpdate.true("Reconciled", "Applied"),
        generation=1,
        now=T2,
    )
    assert untimed[0]["lastTransitionTime"] == T2


def test_now_is_rfc3339_to_the_second() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", now_rfc3339())


def test_the_status_written_is_the_apis_typed_status() -> None:
    """Writers give the API's VoiceAgentStatus with the fields they set; next_status returns its
    wire form: a field of the wrong name or type fails in the operator, never as a status the
    API server prunes or refuses."""
    from pydantic import ValidationError

    new = next_status(None, generation=1, fields=VoiceAgentStatus(active_jobs=2, load=0.5))
    assert VoiceAgentStatus.model_validate(new).active_jobs == 2
    assert (new["activeJobs"], new["load"]) == (2, 0.5)
    assert new["conditions"][0]["type"] == "Ready"
    assert "desiredReplicas" not in new  # only the fields given are written
    kept = next_status(new, generation=1, fields=VoiceAgentStatus(desired_replicas=1))
    assert (kept["activeJobs"], kept["desiredReplicas"]) == (2, 1)  # other writers' kept
    with pytest.raises(ValidationError, match="active_jobs"):
        VoiceAgentStatus(active_jobs=-1)
    with pytest.raises(ValidationError, match="activeJob"):
        VoiceAgentStatus.model_validate({"activeJob": 2})  # a misspelt field
    with pytest.raises(ValueError, match="conditions are updates"):
        next_status(None, generation=1, fields=VoiceAgentStatus(phase="Ready"))


def test_an_observer_without_a_generation_stamps_new_conditions_with_the_reconciled_one() -> None:
    reconciled = next_status(None, generation=5, observed_generation=5, now=T0)
    later = next_status(
        reconciled,
        generation=None,
        updates=[ConditionUpdate.false("TelephonyReady", "LiveKitError", "boom")],
        now=T1,
    )
    telephony = find_condition(later["conditions"], "TelephonyReady")
    assert telephony is not None and telephony["observedGeneration"] == 5


def test_status_changed_compares_whole_statuses() -> None:
    assert not status_changed(None, {})
    assert status_changed(None, {"phase": "Pending"})
    assert not status_changed({"phase": "Ready"}, {"phase": "Ready"})
    assert status_changed({"phase": "Ready"}, {"phase": "Degraded"})
