"""voicefleet_testkit.conditions: the one condition lookup and wait of the tests and the demo."""

from __future__ import annotations

from typing import Any

import pytest
from voicefleet_testkit.conditions import condition, wait_condition
from voicefleet_testkit.waiting import WaitTimeout


def agent(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "support"}, "status": {"conditions": list(conditions)}}


def ready(status: str, reason: str = "Reason", generation: int = 1) -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "observedGeneration": generation}


def test_condition_finds_the_type_or_none() -> None:
    found = agent({"type": "Reconciled", "status": "True"}, ready("False"))
    assert condition(found, "Ready") == ready("False")
    assert condition(found, "TelephonyReady") is None
    assert condition({"metadata": {}}, "Ready") is None
    assert condition({"status": {}}, "Ready") is None


def test_wait_condition_returns_the_agent_once_status_reason_and_generation_match() -> None:
    reads = iter(
        [
            agent(),
            agent(ready("False")),
            agent(ready("True", reason="Other")),
            agent(ready("True", reason="Wanted", generation=1)),
            agent(ready("True", reason="Wanted", generation=2)),
        ]
    )
    seen = wait_condition(
        "ns/support", lambda: next(reads), "Ready", "True", reason="Wanted", generation=2,
        timeout=5, interval=0,
    )  # fmt: skip
    assert condition(seen, "Ready") == ready("True", reason="Wanted", generation=2)
    assert next(reads, None) is None  # every read before it was refused


def test_wait_condition_times_out_naming_what_and_describing() -> None:
    with pytest.raises(WaitTimeout) as raised:
        wait_condition(
            "ns/support", lambda: agent(ready("False")), "Ready", "True", reason="Wanted",
            timeout=0.2, interval=0.05, describe=lambda: "pods: Pending",
        )  # fmt: skip
    message = str(raised.value)
    assert "Ready=True (Wanted) on ns/support" in message
    assert "pods: Pending" in message
