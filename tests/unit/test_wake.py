"""The standby that wakes fleets scaled to zero (wake.py, standby.py): which VoiceAgents get
one, the agent-protocol messages it sends, and how it answers offers."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from livekit.protocol import agent, models
from voicefleet_operator import capacity, standby, wake
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


def pod(name: str, scheduled: str, reason: str = "", **metadata: Any) -> dict[str, Any]:
    condition = {"type": "PodScheduled", "status": scheduled, "reason": reason}
    if reason:
        condition["message"] = "0/1 nodes are available: 1 Insufficient cpu."
    return {"metadata": {"name": name, **metadata}, "status": {"conditions": [condition]}}


def test_no_worker_can_start_only_when_every_live_pod_is_unschedulable() -> None:
    stuck = pod("w-1", "False", "Unschedulable")
    assert capacity.no_worker_can_start([]) == ""  # asleep: the wake creates the pod
    assert "w-1: 0/1 nodes are available" in capacity.no_worker_can_start([stuck])
    # Another pod is scheduled (starting): it may register, the callers keep waiting.
    assert capacity.no_worker_can_start([stuck, pod("w-2", "True")]) == ""
    # ... unless it is being deleted.
    leaving = pod("w-2", "True", deletionTimestamp="2026-01-01T00:00:00Z")
    assert capacity.no_worker_can_start([stuck, leaving])
    # Not yet looked at by the scheduler (no condition): it may still fit.
    assert capacity.no_worker_can_start([stuck, {"metadata": {"name": "w-3"}}]) == ""


class FakeLiveKitAPI:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def __aenter__(self) -> FakeLiveKitAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_callers_are_turned_away_at_once_when_no_worker_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without this the standby would hold each caller for the whole wake timeout."""
    treated: list[tuple[str, str]] = []
    events: list[str] = []
    caller = models.ParticipantInfo(identity="sip_caller", kind=models.ParticipantInfo.Kind.SIP)

    async def callers(lkapi: Any, room: str) -> list[models.ParticipantInfo]:
        return [caller]

    async def treat(lkapi: Any, room: str, found: Any, reason: str) -> None:
        treated.append((room, reason))

    monkeypatch.setattr(wake.livekit_api, "LiveKitAPI", FakeLiveKitAPI)
    monkeypatch.setattr(wake, "_callers", callers)
    monkeypatch.setattr(wake, "_treat", treat)
    monkeypatch.setattr(
        wake, "post_event", lambda body, kind, reason, message: events.append(reason)
    )
    ctx = FakeContext()
    ctx.settings.wake_timeout_seconds = 3600.0
    fleet = wake.FleetStandby(
        cast(OperatorContext, ctx), body(), ("http://127.0.0.1:7880", "key", "secret")
    )

    async def holds_end() -> None:
        await asyncio.gather(*fleet._holds)

    # Held while the fleet may still wake (the pod is being created or scheduled).
    assert fleet.decide(job("room-1")) is Answer.TAKE
    assert fleet.holding and treated == []
    # The autoscaler learns that every worker pod is unschedulable: the held caller is told.
    ctx.state.no_worker_can_start = "no worker pod can be scheduled (w-1)"
    ctx.state.blocked.set()
    await asyncio.wait_for(holds_end(), 10)
    assert treated == [("room-1", wake.UNSCHEDULABLE_REASON)]
    assert events == ["WakeImpossible"] and ctx.state.waiting == {}
    # A caller arriving while that is known: told at once too.
    assert fleet.decide(job("room-2")) is Answer.TAKE
    await asyncio.wait_for(holds_end(), 10)
    assert treated[-1] == ("room-2", wake.UNSCHEDULABLE_REASON)
    await fleet.stop()
