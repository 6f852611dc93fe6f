"""The operator's status and reconcile metrics (metrics.observe_status, observe_reconcile)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from voicefleet_operator import metrics

REGISTRY = metrics.REGISTRY


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_phase_and_conditions_follow_the_status() -> None:
    tenant, agent = "unit-acme", "phases"
    status = {
        "phase": "Degraded",
        "replicas": 3,
        "readyReplicas": 1,
        "conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "TelephonyReady", "status": "False"},
        ],
    }
    metrics.observe_status(tenant, agent, status)
    phase = "voicefleet_operator_voiceagent_phase"
    assert value(phase, tenant=tenant, agent=agent, phase="Degraded") == 1
    assert value(phase, tenant=tenant, agent=agent, phase="Ready") == 0
    condition = "voicefleet_operator_voiceagent_condition"
    telephony = {"tenant": tenant, "agent": agent, "condition": "TelephonyReady"}
    assert value(condition, **telephony, status="False") == 1
    assert value(condition, **telephony, status="True") == 0
    assert value("voicefleet_operator_worker_replicas", tenant=tenant, agent=agent) == 3
    assert value("voicefleet_operator_worker_ready_replicas", tenant=tenant, agent=agent) == 1

    # The numbers are gone: TelephonyReady leaves the status, and its series go too.
    metrics.observe_status(
        tenant, agent, {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}
    )
    assert value(phase, tenant=tenant, agent=agent, phase="Ready") == 1
    assert value(condition, **telephony, status="False") is None

    metrics.forget_voiceagent(tenant, agent)
    assert value(phase, tenant=tenant, agent=agent, phase="Ready") is None
    assert value("voicefleet_operator_worker_replicas", tenant=tenant, agent=agent) is None


@dataclass(frozen=True)
class Outcome:
    applied: bool
    reason: str


def test_reconciles_are_counted_and_timed_by_result() -> None:
    # Counters only grow and the registry is the process's: count from what is there now, so the
    # test holds when the suite runs twice in one process (mutmut's stats run, then its clean run).
    tenant, agent = "unit-acme", "reconciles"
    total = "voicefleet_operator_reconciles_total"
    errors = "voicefleet_operator_reconcile_errors_total"
    durations = "voicefleet_operator_reconcile_duration_seconds_count"

    def counts() -> tuple[float, float, float, float]:
        return (
            value(total, tenant=tenant, agent=agent, result="Applied") or 0,
            value(total, tenant=tenant, agent=agent, result="Exception") or 0,
            value(errors, tenant=tenant, agent=agent, reason="Exception") or 0,
            value(durations, tenant=tenant) or 0,
        )

    applied, failed, error, timed = counts()
    with metrics.observe_reconcile(tenant, agent) as record:
        assert record.done(Outcome(True, "Applied")).applied
    assert counts() == (applied + 1, failed, error, timed + 1)

    with pytest.raises(RuntimeError), metrics.observe_reconcile(tenant, agent):
        raise RuntimeError("boom")
    assert counts() == (applied + 1, failed + 1, error + 1, timed + 2)
