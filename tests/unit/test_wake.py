"""The standby that wakes fleets scaled to zero (wake.py, standby.py): which VoiceAgents get
one, the agent-protocol messages it sends, and how it answers offers."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from livekit.protocol import agent
from voicefleet_operator import standby, wake
from voicefleet_operator.context import OperatorContext, WakeState
from voicefleet_operator.standby import Answer

SPEC: dict[str, Any] = {
    "agents": [{"name": "front", "instructions": "Help."}],
    "entry": "front",
    "pipeline": {
        "stt": {"provider": "openai"},
        "llm": {"provider": "openai"},
        "tts": {"provider": "openai"},
    },
    "scaling": {"minReplicas": 0, "maxReplicas": 2, "spareJobs": 0},
}


def body(**scaling: Any) -> dict[str, Any]:
    spec = {**SPEC, "scaling": {**SPEC["scaling"], **scaling}}
    return {"metadata": {"name": "support", "namespace": "acme", "uid": "u"}, "spec": spec}


def test_every_valid_fleet_not_pinned_to_zero_gets_a_standby() -> None:
    assert wake.wants_standby(body())
    # A fleet that keeps workers may still lose them all (unschedulable, restarting).
    assert wake.wants_standby(body(minReplicas=1))
    assert wake.wants_standby(body(minReplicas=1, mode="hpa"))
    assert wake.wants_standby(body(replicas=2))
    assert not wake.wants_standby(body(replicas=0))  # pinned to no workers: nothing to wake
    deleting = body()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not wake.wants_standby(deleting)
    invalid = body()
    invalid["spec"]["entry"] = "nobody"
    assert not wake.wants_standby(invalid)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:7880", "ws://127.0.0.1:7880/agent"),
        ("ws://livekit:7880/", "ws://livekit:7880/agent"),
        ("https://lk.example.com/base", "wss://lk.example.com/base/agent"),
        ("wss://lk.example.com", "wss://lk.example.com/agent"),
    ],
)
def test_agent_url(url: str, expected: str) -> None:
    assert standby.agent_url(url) == expected


def test_the_standby_registers_a_room_worker_under_the_dispatch_name() -> None:
    message = standby.register_message("acme.support")
    assert message.register.agent_name == "acme.support"
    assert message.register.type == agent.JT_ROOM
    assert message.register.allowed_permissions.agent


def test_taking_ends_the_job_without_an_agent_and_refusing_lets_another_worker_try() -> None:
    taken = standby.availability_message("AJ_1", Answer.TAKE).availability
    assert (taken.job_id, taken.available, taken.terminate) == ("AJ_1", False, True)
    refused = standby.availability_message("AJ_2", Answer.REFUSE).availability
    assert (refused.available, refused.terminate) == (False, False)


class FakeContext:
    def __init__(self) -> None:
        self.state = WakeState()
        self.settings = type("S", (), {"wake_timeout_seconds": 25.0})()

    def wake(self, namespace: str, name: str) -> WakeState:
        return self.state


def job(room: str, dispatch_id: str = "AD_1") -> agent.Job:
    offered = agent.Job(id=f"AJ_{room}", dispatch_id=dispatch_id)
    offered.room.name = room
    return offered


async def test_an_offer_is_taken_only_while_no_worker_is_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[str] = []

    async def hold(self: wake.FleetStandby, offered: agent.Job) -> None:
        held.append(offered.room.name)

    monkeypatch.setattr(wake.FleetStandby, "_hold", hold)
    ctx = FakeContext()
    fleet = wake.FleetStandby(
        cast(OperatorContext, ctx), body(), ("http://127.0.0.1:7880", "key", "secret")
    )
    assert fleet.agent_name == "acme.support"

    # Asleep: the caller is held, the autoscaler nudged to count it.
    assert fleet.decide(job("room-1")) is Answer.TAKE
    assert set(ctx.state.waiting) == {"room-1"} and ctx.state.nudge.is_set()
    # A second dispatch of the same room: taken, one hold.
    assert fleet.decide(job("room-1", "AD_2")) is Answer.TAKE
    await asyncio.sleep(0)
    assert held == ["room-1"]

    # The standby's own handover dispatch is never taken back.
    fleet.handovers.add("AD_handover")
    assert fleet.decide(job("room-2", "AD_handover")) is Answer.REFUSE

    # Awake: new callers go to the fleet's workers.
    ctx.state.registered_workers = 1
    assert fleet.decide(job("room-3")) is Answer.REFUSE
    assert "room-3" not in ctx.state.waiting
