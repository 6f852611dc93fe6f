"""The standby that wakes fleets scaled to zero (wake.py, standby.py): which VoiceAgents get
one, the agent-protocol messages it sends, and how it answers offers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

import pytest
from livekit.protocol import agent, agent_dispatch, models
from voicefleet_operator import capacity, standby, wake
from voicefleet_operator.context import UNSCHEDULABLE_CONFIRM_SECONDS, OperatorContext, WakeState
from voicefleet_operator.standby import Answer

OVERFLOW = wake.OVERFLOW_ATTRIBUTE
DESK = wake.DESK_ATTRIBUTE

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
        self.settings = type("S", (), {"wake_timeout_seconds": 25.0, "desk_url": None})()

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
    # The scheduler's verdict without a message: the pod is named, nothing after it.
    silent = pod("w-4", "False", "Unschedulable")
    del silent["status"]["conditions"][0]["message"]
    assert capacity.no_worker_can_start([silent]) == "no worker pod can be scheduled (w-4)"


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
    ctx.state.observe_unschedulable("no worker pod can be scheduled (w-1)", 100.0)
    ctx.state.observe_unschedulable("no worker pod can be scheduled (w-1)", 103.0)
    await asyncio.wait_for(holds_end(), 10)
    assert treated == [("room-1", wake.UNSCHEDULABLE_REASON)]
    assert events == ["WakeImpossible"] and ctx.state.waiting == {}
    # A caller arriving while that is known: told at once too.
    assert fleet.decide(job("room-2")) is Answer.TAKE
    await asyncio.wait_for(holds_end(), 10)
    assert treated[-1] == ("room-2", wake.UNSCHEDULABLE_REASON)
    await fleet.stop()


def dispatch(agent_name: str, created: float, *jobs: tuple[str, float]) -> Any:
    """An AgentDispatch as ListDispatch returns it; jobs: (participant identity, ended at)."""
    made = agent_dispatch.AgentDispatch(id="AD_x", agent_name=agent_name, metadata="m")
    made.attributes["k"] = "v"
    made.state.created_at = int(created * 1e9)
    for identity, ended in jobs:
        job = made.state.jobs.add()
        job.state.participant_identity = identity
        job.state.ended_at = int(ended * 1e9)
    return made


def participant(identity: str, kind: Any, **attributes: str) -> models.ParticipantInfo:
    found = models.ParticipantInfo(identity=identity, kind=kind)
    found.attributes.update(attributes)
    return found


def test_a_room_is_an_orphan_when_its_caller_waits_for_a_fleet_no_one_serves() -> None:
    now = 1_000.0
    names = {"acme.support"}
    sip = participant("sip_caller", models.ParticipantInfo.Kind.SIP)
    agent_in_room = participant("agent-1", models.ParticipantInfo.Kind.AGENT)
    taken = dispatch("acme.support", now - 20, ("", now - 19))  # the standby took it

    # Taken by a standby whose leader died: waiting since the take.
    found = wake.orphan_of("r", [taken], [sip], names, now)
    assert found == wake.Orphan("r", "acme.support", "m", {"k": "v"}, now - 19)
    # Dropped (no worker or standby registered when it came): waiting since the dispatch.
    dropped = dispatch("acme.support", now - 30)
    assert wake.orphan_of("r", [dropped], [sip], names, now).since == now - 30  # type: ignore[union-attr]
    # Not an orphan: another fleet's dispatch, an agent in the room, an agent assigned (the call
    # was answered and the agent left), no caller, a caller told already, a dispatch so young it
    # may still be on its way to a worker.
    assert wake.orphan_of("r", [dispatch("other.fleet", now - 30)], [sip], names, now) is None
    assert wake.orphan_of("r", [taken], [sip, agent_in_room], names, now) is None
    # The platform desk holding the caller (a dead leader's hold) is not the fleet's agent.
    desk = participant("voicefleet-desk-r", models.ParticipantInfo.Kind.AGENT, **{DESK: "holding"})
    assert wake.orphan_of("r", [taken], [sip, desk], names, now) == found
    assert wake.orphan_of("r", [taken], [desk], names, now) is None  # no caller: nobody waits
    answered = dispatch("acme.support", now - 30, ("agent-1", 0.0))
    assert wake.orphan_of("r", [taken, answered], [sip], names, now) is None
    assert wake.orphan_of("r", [taken], [], names, now) is None
    told = participant("web", models.ParticipantInfo.Kind.STANDARD, **{OVERFLOW: "wake_timeout"})
    assert wake.orphan_of("r", [taken], [told], names, now) is None
    young = dispatch("acme.support", now - 2)
    assert wake.orphan_of("r", [young], [sip], names, now) is None
    assert wake.orphan_of("r", [taken, young], [sip], names, now) is None
    # ... which is looked at again later.
    assert wake.too_young([young, taken], names, now) == {"acme.support"}
    assert wake.too_young([dropped, taken, dispatch("other.fleet", now - 2)], names, now) == set()


async def test_an_adopted_caller_is_held_and_counts_its_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[agent.Job] = []

    async def hold(self: wake.FleetStandby, offered: agent.Job) -> None:
        held.append(offered)

    monkeypatch.setattr(wake.FleetStandby, "_hold", hold)
    ctx = FakeContext()
    fleet = wake.FleetStandby(
        cast(OperatorContext, ctx), body(), ("http://127.0.0.1:7880", "key", "secret")
    )
    orphan = wake.Orphan("room-9", "acme.support", "meta", {"k": "v"}, time.time() - 10)
    fleet.adopt(orphan)
    fleet.adopt(orphan)  # found twice: held once
    await asyncio.sleep(0)
    assert [(j.room.name, j.metadata, dict(j.attributes)) for j in held] == [
        ("room-9", "meta", {"k": "v"})
    ]
    assert ctx.state.nudge.is_set()
    assert time.monotonic() - ctx.state.waiting["room-9"] >= 10


def test_every_pod_unschedulable_counts_once_it_has_held_a_while() -> None:
    state = WakeState()
    why = "no worker pod can be scheduled (w-1)"
    state.observe_unschedulable(why, 100.0)
    assert not state.blocked.is_set() and state.no_worker_can_start == ""  # maybe short-lived
    state.observe_unschedulable(why, 101.0)
    assert not state.blocked.is_set()
    state.observe_unschedulable("", 102.0)  # bound after all: the spell is over
    state.observe_unschedulable(why, 103.0)
    assert not state.blocked.is_set()
    state.observe_unschedulable(why, 103.0 + UNSCHEDULABLE_CONFIRM_SECONDS)
    assert state.blocked.is_set() and state.no_worker_can_start == why
    state.observe_unschedulable("", 200.0)
    assert not state.blocked.is_set() and state.no_worker_can_start == ""


async def test_the_standby_follows_kopfs_live_body_without_reading_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon registers the standby once the autoscaler has evaluated the fleet, keeps the
    newest body on it, and stops it when a new generation pins the fleet to zero: all from
    kopf's live body (the fake context has no API client to read with)."""
    import kopf

    started: list[str] = []
    stopped_fleets: list[str] = []

    def start(self: wake.FleetStandby) -> None:
        started.append(self.agent_name)

    async def stop(self: wake.FleetStandby) -> None:
        stopped_fleets.append(self.agent_name)

    monkeypatch.setattr(wake.FleetStandby, "start", start)
    monkeypatch.setattr(wake.FleetStandby, "stop", stop)
    monkeypatch.setattr(wake, "CHECK_SECONDS", 0.01)
    credentials = ("http://127.0.0.1:7880", "key", "secret")

    class Context(FakeContext):
        forgotten = False
        checks = 0

        def wake(self, namespace: str, name: str) -> WakeState:
            self.checks += 1  # once per check of a VoiceAgent that wants a standby
            return self.state

        async def livekit_credentials(self) -> tuple[str, str, str]:
            return credentials

        def forget_wake(self, namespace: str, name: str) -> None:
            self.forgotten = True

    ctx = Context()
    first = {**body(), "metadata": {**body()["metadata"], "generation": 1}}
    live = kopf.Body(cast(kopf.RawBody, first))

    class Stopped:  # what the loop uses of kopf.DaemonStopped
        flag = asyncio.Event()

        def __bool__(self) -> bool:
            return self.flag.is_set()

        async def wait(self, seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flag.wait(), seconds)

    daemon_stopped = Stopped()
    loop = asyncio.create_task(wake.keep_standby(cast(OperatorContext, ctx), live, daemon_stopped))

    async def until(what: Any) -> None:
        for _ in range(500):
            if what():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the standby loop did not get there")

    # Before the autoscaler's first evaluation nothing registers.
    await until(lambda: ctx.checks >= 3)
    assert started == []
    ctx.state.evaluated = True
    await until(lambda: started == ["acme.support"])

    newer = {**body(replicas=0), "metadata": {**body()["metadata"], "generation": 2}}
    live._replace_with(cast(kopf.RawBody, newer))  # what kopf does on each watch event
    await until(lambda: stopped_fleets == ["acme.support"])
    assert started == ["acme.support"]

    daemon_stopped.flag.set()
    await asyncio.wait_for(loop, 5)
    assert ctx.forgotten


def test_a_resync_is_skipped_only_right_after_another_reconcile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voicefleet_operator.settings import PlatformSettings

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    ctx = OperatorContext(settings=cast(PlatformSettings, None), kube=cast(Any, None))
    assert not ctx.reconciled_within("acme", "support", 30)  # never reconciled here
    assert not ctx.attempted("acme", "support")  # the recheck leaves it to kopf's handler
    ctx.mark_reconciled("acme", "support")
    assert ctx.attempted("acme", "support")
    clock[0] += 29.9
    assert ctx.reconciled_within("acme", "support", 30)
    assert not ctx.reconciled_within("acme", "other", 30)
    clock[0] += 0.2
    assert not ctx.reconciled_within("acme", "support", 30)
    ctx.mark_reconciled("acme", "support")
    ctx.forget_reconciled("acme", "support")  # deleted: a new VoiceAgent of that name starts fresh
    assert not ctx.reconciled_within("acme", "support", 30)
    assert not ctx.attempted("acme", "support")


def test_the_recheck_waits_for_a_new_voiceagents_first_attempt_only() -> None:
    from voicefleet_operator import handlers

    ctx = OperatorContext(settings=cast(Any, None), kube=cast(Any, None))
    meta = {"generation": 2}
    new: dict[str, Any] = {}  # no status yet: the create handler is queued
    assert not handlers._recheck_wanted(ctx, "acme", "support", new, meta)
    ctx.mark_reconciled("acme", "support")
    assert handlers._recheck_wanted(ctx, "acme", "support", new, meta)

    # A generation behind is rechecked even before this run attempted it (a change kopf merged
    # into a cause whose handler had already succeeded, e.g. across a restart).
    behind = {"observedGeneration": 1}
    assert handlers._recheck_wanted(ctx, "acme", "other", behind, meta)
    caught_up = {
        "observedGeneration": 2,
        "conditions": [
            {"type": "ConfigValid", "status": "True"},
            {"type": "Reconciled", "status": "True"},
        ],
    }
    assert not handlers._recheck_wanted(ctx, "acme", "other", caught_up, meta)
