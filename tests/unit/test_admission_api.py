"""spec.limits and spec.overflow: bad input refused naming the field; what the workers are told
(rendered admission budget and overflow treatment) and how the cap bounds the replicas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator.api import SpecError, minimum_capacity, parse_spec
from voicefleet_operator.render import VoiceAgentRef, admission_settings, runtime_config
from voicefleet_operator.scaling import ScalingPolicy, max_replicas_within_cap
from voicefleet_runtime.admission import AdmissionGate, OverflowReason
from voicefleet_runtime.overflow import reject_headers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def spec(**sections: Any) -> dict[str, Any]:
    document = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    for name, value in sections.items():
        document[name] = {**document.get(name, {}), **value}
    return document


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        # minReplicas 2 x floor(10 x 0.7) = 14 calls at the fleet's smallest
        (
            {"scaling": {"minReplicas": 2}, "limits": {"maxConcurrentCalls": 13}},
            "limits.maxConcurrentCalls (13) is below the fleet's minimum capacity (14",
        ),
        (
            {"scaling": {"replicas": 3}, "limits": {"maxConcurrentCalls": 20}},
            "limits.maxConcurrentCalls (20) is below the fleet's minimum capacity (21",
        ),
        ({"limits": {"maxConcurrentCalls": 0}}, "spec.limits.maxConcurrentCalls"),
        (
            {"overflow": {"sip": {"action": "transfer", "transferTo": "555-OVERFLOW"}}},
            "spec.overflow.sip.transferTo",
        ),
        (
            {"overflow": {"sip": {"action": "transfer"}}},
            "sip.action transfer needs sip.transferTo",
        ),
        ({"overflow": {"sip": {"status": 404}}}, "spec.overflow.sip.status"),
        ({"overflow": {"message": ""}}, "spec.overflow.message"),
    ],
)
def test_bad_limits_and_overflow_are_refused_naming_the_field(
    sections: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec(**sections))
    assert expected in str(raised.value)


def test_minimum_capacity() -> None:
    assert minimum_capacity(parse_spec(spec(scaling={"minReplicas": 2}))) == 14
    assert minimum_capacity(parse_spec(spec(scaling={"minReplicas": 0}))) == 0
    assert minimum_capacity(parse_spec(spec(scaling={"replicas": 1, "minReplicas": 3}))) == 7


def test_a_cap_at_the_minimum_capacity_is_accepted() -> None:
    parsed = parse_spec(spec(scaling={"minReplicas": 2}, limits={"maxConcurrentCalls": 14}))
    assert parsed.limits.max_concurrent_calls == 14


@pytest.mark.parametrize(
    ("cap", "rendered"),
    [
        (None, {"limitReason": "capacity"}),
        (7, {"limitReason": "capacity"}),
        (50, {"limitReason": "capacity"}),
        (3, {"maxAgentJobs": 3, "limitReason": "agent_limit"}),
    ],
)
def test_rendered_admission(cap: int | None, rendered: dict[str, Any]) -> None:
    limits = {} if cap is None else {"maxConcurrentCalls": cap}
    parsed = parse_spec(spec(scaling={"minReplicas": 0}, limits=limits))
    assert admission_settings(parsed) == rendered


def test_workers_are_told_the_budget_and_the_treatment() -> None:
    parsed = parse_spec(
        spec(
            scaling={"minReplicas": 0},
            limits={"maxConcurrentCalls": 2},
            overflow={
                "message": "We are full.",
                "sip": {"action": "transfer", "transferTo": "+15551239999"},
            },
        )
    )
    config = runtime_config(VoiceAgentRef(name="support", namespace="acme", uid="uid-1"), parsed)
    gate = AdmissionGate.for_worker(
        config.worker.jobs_per_worker, config.worker.load_threshold, config.admission
    )
    assert (gate.budget, gate.reason) == (2, OverflowReason.AGENT_LIMIT)
    assert config.overflow.message == "We are full."
    assert config.overflow.sip.transfer_to == "+15551239999"


@pytest.mark.parametrize(
    ("cap", "min_replicas", "max_replicas", "expected"),
    [
        (None, 1, 10, 10),
        (7, 1, 10, 1),  # one pod takes floor(10 x 0.7) = 7
        (8, 1, 10, 2),
        (100, 1, 10, 10),
        (14, 2, 10, 2),
    ],
)
def test_the_cap_bounds_the_replicas(
    cap: int | None, min_replicas: int, max_replicas: int, expected: int
) -> None:
    limits = {} if cap is None else {"maxConcurrentCalls": cap}
    parsed = parse_spec(
        spec(scaling={"minReplicas": min_replicas, "maxReplicas": max_replicas}, limits=limits)
    )
    assert max_replicas_within_cap(parsed) == expected
    assert ScalingPolicy.from_spec(parsed).max_replicas == expected


def test_sip_rejection_headers() -> None:
    busy = parse_spec(spec()).overflow
    assert reject_headers(busy, "capacity") == {"X-VoiceFleet-Overflow": "capacity"}
    unavailable = parse_spec(spec(overflow={"sip": {"status": 503}})).overflow
    assert reject_headers(unavailable, "agent_limit") == {
        "X-VoiceFleet-Overflow": "agent_limit",
        "Reason": 'SIP ;cause=503 ;text="Service Unavailable"',
    }
