"""The operator's push of a worker's share of the caps (PUT /admission), worker side."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from voicefleet_runtime.admission import (
    AdmissionGate,
    AdmissionReport,
    AdmissionSettings,
    AdmissionUpdate,
    Admit,
    OverflowReason,
)


def test_a_pushed_budget_never_exceeds_the_capacity_and_says_its_reason() -> None:
    gate = AdmissionGate.for_worker(10, 0.7, AdmissionSettings())
    gate.set_budget(3, OverflowReason.NAMESPACE_LIMIT)
    assert (gate.budget, gate.reason) == (3, OverflowReason.NAMESPACE_LIMIT)
    gate.set_budget(50, OverflowReason.AGENT_LIMIT)
    assert (gate.budget, gate.reason) == (7, OverflowReason.CAPACITY)
    gate.set_budget(0, OverflowReason.AGENT_LIMIT)
    assert gate.admit(0, 0) == (Admit.OVERFLOW, "agent_limit")


def test_a_lowered_budget_keeps_running_calls_and_overflows_new_ones() -> None:
    gate = AdmissionGate.for_worker(4, 1.0, AdmissionSettings())
    assert [gate.admit(0, 0)[0] for _ in range(3)] == [Admit.AGENT] * 3
    gate.set_budget(1, OverflowReason.AGENT_LIMIT)  # 3 pending calls go on
    assert gate.admit(0, 0) == (Admit.OVERFLOW, "agent_limit")
    assert gate.report(0, 0).agent_jobs == 3


def test_report_and_update_wire_format() -> None:
    gate = AdmissionGate.for_worker(2, 1.0, AdmissionSettings())
    gate.admit(1, 0)
    report = gate.report(1, 2)
    assert report.model_dump(mode="json", by_alias=True) == {
        "agentJobs": 2,
        "overflowJobs": 2,
        "budget": 2,
        "capacity": 2,
        "limitReason": "capacity",
        "overflowSlots": 4,
        "draining": False,
    }
    assert AdmissionReport.model_validate(report.model_dump(by_alias=True)) == report
    update = AdmissionUpdate.model_validate({"maxAgentJobs": 1, "limitReason": "agent_limit"})
    assert update.max_agent_jobs == 1
    with pytest.raises(ValidationError):
        AdmissionUpdate.model_validate({"maxAgentJobs": -1, "limitReason": "agent_limit"})
    with pytest.raises(ValidationError):
        AdmissionUpdate.model_validate({"maxAgentJobs": 1, "limitReason": "whatever"})
