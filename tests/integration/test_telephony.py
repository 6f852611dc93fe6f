"""TelephonyProvisioner against a real livekit-server (+ Redis), through livekit-api."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc
from livekit.agents import ToolError
from livekit.protocol.sip import (
    CreateSIPInboundTrunkRequest,
    DeleteSIPDispatchRuleRequest,
    DeleteSIPTrunkRequest,
    SIPInboundTrunkInfo,
)
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_operator import telephony
from voicefleet_operator.telephony import (
    SipAuth,
    TelephonyError,
    TelephonyProvisioner,
    TelephonyTarget,
)
from voicefleet_runtime.telephony import TRANSFER_SUCCEEDED, CallControls, PhoneCall
from voicefleet_testkit import sipcall

pytestmark = pytest.mark.integration


def fresh_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


def make_target(namespace: str, name: str = "agent", **overrides: object) -> TelephonyTarget:
    fields: dict[str, object] = {
        "namespace": namespace,
        "name": name,
        "created": "2025-01-01T00:00:00Z",
        "dispatch_name": f"{namespace}--{name}",
        "numbers": (fresh_number(),),
    }
    fields.update(overrides)
    return TelephonyTarget(**fields)  # type: ignore[arg-type]


async def call_a_fresh_number(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    dispatch_name: str,
    scenario: str,
    workdir: Path,
    **call: Any,
) -> tuple[str, sipcall.CallResult]:
    """A number of its own routed to `dispatch_name` (trunk and dispatch rule, as the operator
    provisions them), one sipp call to it with `scenario` and `call` options, the number freed:
    (the number, the call's result)."""
    target = make_target(f"it-{secrets.token_hex(4)}", dispatch_name=dispatch_name)
    async with livekit.api() as lkapi:
        provisioner = TelephonyProvisioner(lkapi)
        await provisioner.ensure(target, [target.claim])
        try:
            result = await asyncio.to_thread(
                sipcall.place_call,
                scenario,
                target.numbers[0],
                workdir,
                sip_host=sip.host,
                sip_port=sip.port,
                **call,
            )
        finally:
            await provisioner.remove(target.namespace, target.name)
    return target.numbers[0], result


@pytest.fixture
async def lkapi(livekit: LiveKitEndpoint) -> AsyncIterator[api.LiveKitAPI]:
    async with livekit.api() as client:
        yield client


@pytest.fixture
def tenant() -> str:
    """A namespace of its own, so tests sharing the server's Redis never see each other."""
    return f"it-{secrets.token_hex(4)}"


@pytest.fixture
async def provisioner(lkapi: api.LiveKitAPI, tenant: str) -> AsyncIterator[TelephonyProvisioner]:
    provisioner = TelephonyProvisioner(lkapi)
    yield provisioner
    # Leave nothing behind for the next test, whatever this one did.
    for trunk in await provisioner.list_trunks():
        owner = telephony.owner_of(trunk.name) or ""
        if owner.startswith(f"{tenant}"):
            await provisioner.remove(*owner.split("/"))


async def owned(
    provisioner: TelephonyProvisioner, target: TelephonyTarget
) -> tuple[list[SIPInboundTrunkInfo], list[api.SIPDispatchRuleInfo]]:
    name = telephony.object_name(target.namespace, target.name)
    trunks = [t for t in await provisioner.list_trunks() if t.name == name]
    rules = [r for r in await provisioner.list_rules() if r.name == name]
    return trunks, rules


async def test_create_update_in_place_and_delete(
    provisioner: TelephonyProvisioner, tenant: str
) -> None:
    target = make_target(tenant, auth=SipAuth("carrier", "first-password"))
    result = await provisioner.ensure(target, [target.claim])

    assert result.numbers == target.numbers
    assert result.conflicts == ()
    assert result.trunk_id and result.trunk_id.startswith("ST_")
    assert result.dispatch_rule_id and result.dispatch_rule_id.startswith("SDR_")
    assert result.changes == (
        f"created SIP trunk {result.trunk_id}",
        f"created SIP dispatch rule {result.dispatch_rule_id}",
    )
    trunks, rules = await owned(provisioner, target)
    assert [t.sip_trunk_id for t in trunks] == [result.trunk_id]
    assert list(trunks[0].numbers) == list(target.numbers)
    assert trunks[0].auth_username == "carrier"
    assert [r.sip_dispatch_rule_id for r in rules] == [result.dispatch_rule_id]
    assert list(rules[0].trunk_ids) == [result.trunk_id]
    assert rules[0].rule.dispatch_rule_individual.room_prefix == f"call_{tenant}_agent"
    assert [a.agent_name for a in rules[0].room_config.agents] == [target.dispatch_name]

    # Nothing changed: a second pass writes nothing.
    again = await provisioner.ensure(target, [target.claim])
    assert (again.trunk_id, again.dispatch_rule_id, again.changes) == (
        result.trunk_id,
        result.dispatch_rule_id,
        (),
    )

    # New numbers and a rotated password update the same trunk.
    changed = make_target(
        tenant,
        numbers=(fresh_number(), fresh_number()),
        allowed_addresses=("192.0.2.0/24",),
        auth=SipAuth("carrier", "rotated-password"),
    )
    updated = await provisioner.ensure(changed, [changed.claim])
    assert updated.trunk_id == result.trunk_id
    assert updated.dispatch_rule_id == result.dispatch_rule_id
    assert updated.changes == (f"updated SIP trunk {result.trunk_id}",)
    trunks, _ = await owned(provisioner, changed)
    assert list(trunks[0].numbers) == list(changed.numbers)
    assert list(trunks[0].allowed_addresses) == ["192.0.2.0/24"]
    assert trunks[0].auth_password == "rotated-password"

    # A new dispatch name updates the rule in place.
    renamed = make_target(
        tenant,
        numbers=changed.numbers,
        allowed_addresses=changed.allowed_addresses,
        auth=changed.auth,
        dispatch_name="renamed-dispatch",
    )
    rerouted = await provisioner.ensure(renamed, [renamed.claim])
    assert rerouted.changes == (f"updated SIP dispatch rule {result.dispatch_rule_id}",)

    deleted = await provisioner.remove(tenant, "agent")
    assert set(deleted) == {
        f"deleted SIP dispatch rule {result.dispatch_rule_id}",
        f"deleted SIP trunk {result.trunk_id}",
    }
    assert await owned(provisioner, target) == ([], [])
    # Deleting again is a no-op, not an error.
    assert await provisioner.remove(tenant, "agent") == ()


async def test_a_restarted_operator_finds_its_objects_again(
    livekit: LiveKitEndpoint,
    provisioner: TelephonyProvisioner,
    tenant: str,
) -> None:
    target = make_target(tenant)
    first = await provisioner.ensure(target, [target.claim])
    # A new process: new client, new provisioner, no memory of IDs.
    async with livekit.api() as other_client:
        second = await TelephonyProvisioner(other_client).ensure(target, [target.claim])
    assert (second.trunk_id, second.dispatch_rule_id) == (first.trunk_id, first.dispatch_rule_id)
    assert second.changes == ()
    trunks, rules = await owned(provisioner, target)
    assert (len(trunks), len(rules)) == (1, 1)


async def test_objects_deleted_behind_the_operators_back_are_recreated(
    lkapi: api.LiveKitAPI, provisioner: TelephonyProvisioner, tenant: str
) -> None:
    target = make_target(tenant)
    first = await provisioner.ensure(target, [target.claim])
    assert first.trunk_id and first.dispatch_rule_id

    await lkapi.sip.delete_trunk(DeleteSIPTrunkRequest(sip_trunk_id=first.trunk_id))
    healed = await provisioner.ensure(target, [target.claim])
    assert healed.trunk_id != first.trunk_id
    assert healed.dispatch_rule_id == first.dispatch_rule_id
    assert healed.changes == (
        f"created SIP trunk {healed.trunk_id}",
        f"updated SIP dispatch rule {first.dispatch_rule_id}",
    )
    _, rules = await owned(provisioner, target)
    assert list(rules[0].trunk_ids) == [healed.trunk_id]

    await lkapi.sip.delete_dispatch_rule(
        DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=first.dispatch_rule_id)
    )
    healed_rule = await provisioner.ensure(target, [target.claim])
    assert healed_rule.dispatch_rule_id != first.dispatch_rule_id
    assert healed_rule.changes == (f"created SIP dispatch rule {healed_rule.dispatch_rule_id}",)
    trunks, rules = await owned(provisioner, target)
    assert (len(trunks), len(rules)) == (1, 1)


async def test_duplicates_left_by_a_race_are_reduced_to_one(
    lkapi: api.LiveKitAPI, provisioner: TelephonyProvisioner, tenant: str
) -> None:
    target = make_target(tenant)
    first = await provisioner.ensure(target, [target.claim])
    # Another writer created a second trunk under the same name (with another number).
    extra = await lkapi.sip.create_inbound_trunk(
        CreateSIPInboundTrunkRequest(
            trunk=SIPInboundTrunkInfo(
                name=telephony.object_name(tenant, "agent"), numbers=[fresh_number()]
            )
        )
    )
    result = await provisioner.ensure(target, [target.claim])
    assert result.trunk_id == first.trunk_id
    assert f"deleted SIP trunk {extra.sip_trunk_id}" in result.changes
    trunks, rules = await owned(provisioner, target)
    assert ([t.sip_trunk_id for t in trunks], len(rules)) == ([first.trunk_id], 1)


async def test_a_number_held_by_another_tenant_is_not_taken_over(
    provisioner: TelephonyProvisioner, tenant: str
) -> None:
    shared = fresh_number()
    first = make_target(f"{tenant}-a", numbers=(shared,), created="2025-06-01T00:00:00Z")
    # Created earlier in the cluster, but the number is already in service for `first`.
    later = make_target(
        f"{tenant}-b", numbers=(shared, own := fresh_number()), created="2025-01-01T00:00:00Z"
    )
    claims = [first.claim, later.claim]
    held = await provisioner.ensure(first, [first.claim])
    assert held.numbers == (shared,)

    refused = await provisioner.ensure(later, claims)
    assert refused.numbers == (own,)
    assert [c.number for c in refused.conflicts] == [shared]
    assert f"VoiceAgent {tenant}-a/agent (SIP trunk {held.trunk_id})" in refused.conflicts[0].holder
    condition = telephony.ready_condition(refused, later.dispatch_name)
    assert condition.reason == "NumberConflict" and shared in condition.message

    # The holder is untouched.
    trunks, _ = await owned(provisioner, first)
    assert [list(t.numbers) for t in trunks] == [[shared]]

    # When the holder goes, the next pass hands the number over.
    await provisioner.remove(f"{tenant}-a", "agent")
    taken = await provisioner.ensure(later, [later.claim])
    assert set(taken.numbers) == {shared, own}
    assert taken.conflicts == ()
    await provisioner.remove(f"{tenant}-b", "agent")


async def test_simultaneous_claims_leave_exactly_one_holder(
    provisioner: TelephonyProvisioner, tenant: str
) -> None:
    shared = fresh_number()
    older = make_target(f"{tenant}-a", numbers=(shared,), created="2025-01-01T00:00:00Z")
    newer = make_target(f"{tenant}-b", numbers=(shared,), created="2025-01-01T00:00:01Z")
    claims = [older.claim, newer.claim]
    # The newer one reconciles first: it must not grab the number.
    lost = await provisioner.ensure(newer, claims)
    won = await provisioner.ensure(older, claims)
    assert (lost.numbers, lost.trunk_id, lost.dispatch_rule_id) == ((), None, None)
    assert won.numbers == (shared,)
    holders = [t for t in await provisioner.list_trunks() if shared in t.numbers]
    assert [t.sip_trunk_id for t in holders] == [won.trunk_id]
    await provisioner.remove(f"{tenant}-a", "agent")


async def test_a_trunk_outside_voicefleet_keeps_its_number(
    lkapi: api.LiveKitAPI, provisioner: TelephonyProvisioner, tenant: str
) -> None:
    number = fresh_number()
    manual = await lkapi.sip.create_inbound_trunk(
        CreateSIPInboundTrunkRequest(trunk=SIPInboundTrunkInfo(name="carrier", numbers=[number]))
    )
    try:
        target = make_target(tenant, numbers=(number,))
        result = await provisioner.ensure(target, [target.claim])
        assert result.numbers == ()
        assert manual.sip_trunk_id in result.conflicts[0].holder
        assert await owned(provisioner, target) == ([], [])
    finally:
        await lkapi.sip.delete_trunk(DeleteSIPTrunkRequest(sip_trunk_id=manual.sip_trunk_id))


async def test_unreachable_livekit_is_a_telephony_error_with_the_cause(tenant: str) -> None:
    # Port 9 (discard) is closed here: the request fails at once.
    async with api.LiveKitAPI(
        "http://127.0.0.1:9", "key", "secret-secret-secret-secret-0000"
    ) as bad:
        target = make_target(tenant)
        with pytest.raises(TelephonyError, match="list SIP inbound trunks failed") as caught:
            await TelephonyProvisioner(bad).ensure(target, [target.claim])
    assert "secret-secret" not in str(caught.value)


async def test_rejected_credentials_are_a_telephony_error(
    livekit: LiveKitEndpoint,
    tenant: str,
) -> None:
    async with api.LiveKitAPI(livekit.url, livekit.api_key, "x" * 40) as wrong_secret:
        target = make_target(tenant)
        with pytest.raises(TelephonyError, match=r"HTTP 401"):
            await TelephonyProvisioner(wrong_secret).ensure(target, [target.claim])


# --- runtime side: hang-up and transfer through livekit-api ---------------------------------


async def _join(livekit: LiveKitEndpoint, room_name: str, identity: str) -> rtc.Room:
    token = (
        api.AccessToken(livekit.api_key, livekit.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    room = rtc.Room()
    await room.connect(livekit.url, token)
    return room


async def test_hang_up_deletes_the_room_and_disconnects_the_caller(
    livekit: LiveKitEndpoint,
    lkapi: api.LiveKitAPI,
) -> None:
    room_name = f"call_it_{secrets.token_hex(4)}"
    caller = await _join(livekit, room_name, "caller")
    disconnected = asyncio.Event()
    caller.on("disconnected", lambda *_: disconnected.set())
    try:
        controls = CallControls(room_name, None, None, api_factory=livekit.api)
        assert [t.info.name for t in controls.function_tools()] == ["end_call"]
        await controls.hang_up()
        await asyncio.wait_for(disconnected.wait(), timeout=10)
        rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
        assert list(rooms.rooms) == []
        # Hanging up a call that is already gone is not an error.
        await controls.hang_up()
    finally:
        await caller.disconnect()


async def test_transfer_of_a_participant_that_is_not_a_sip_call_is_a_tool_error(
    livekit: LiveKitEndpoint,
) -> None:
    room_name = f"call_it_{secrets.token_hex(4)}"
    caller = await _join(livekit, room_name, "web-caller")
    try:
        call = PhoneCall(room_name, "web-caller", "+15550000001", "+15550000002", "")
        controls = CallControls(room_name, call, "+15559990000", api_factory=livekit.api)
        names = [t.info.name for t in controls.function_tools()]
        assert names == ["end_call", "transfer_to_human"]
        with pytest.raises(ToolError, match="transfer did not go through"):
            await controls.transfer("caller asked for a person")
        assert controls.transfers == []
    finally:
        await caller.disconnect()


# --- calls through livekit-sip: sipp dials a provisioned number ------------------------------


class FakeAgent:
    """Stands in for a worker: joins the call's room, plays a tone and measures what it hears."""

    def __init__(self, livekit: LiveKitEndpoint, room_prefix: str) -> None:
        self.livekit = livekit
        self.room_prefix = room_prefix
        self.room_name = ""
        self.dispatched: list[tuple[str, str]] = []
        self.caller: rtc.RemoteParticipant | None = None
        self.room: rtc.Room | None = None
        self.heard_rms: list[float] = []
        self.joined = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        async with self.livekit.api() as lkapi:
            for _ in range(300):
                listed = await lkapi.room.list_rooms(api.ListRoomsRequest())
                names = [r.name for r in listed.rooms if r.name.startswith(self.room_prefix)]
                if names:
                    self.room_name = names[0]
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no room starting with {self.room_prefix!r} appeared")
            dispatches = await lkapi.agent_dispatch.list_dispatch(self.room_name)
            self.dispatched = [(d.agent_name, d.metadata) for d in dispatches]
        room = self.room = await _join(self.livekit, self.room_name, "fake-agent")
        room.on("track_subscribed", self._on_track)
        try:
            for _ in range(100):
                if room.remote_participants:
                    break
                await asyncio.sleep(0.05)
            self.caller = next(iter(room.remote_participants.values()))
            source = rtc.AudioSource(48000, 1)
            track = rtc.LocalAudioTrack.create_audio_track("tone", source)
            await room.local_participant.publish_track(track)
            self.joined.set()
            sent = 0
            while not self._stop.is_set() and room.isconnected():
                index = np.arange(sent, sent + 480)
                tone = (0.3 * np.sin(2 * np.pi * 440 * index / 48000) * 32767).astype(np.int16)
                await source.capture_frame(rtc.AudioFrame(tone.tobytes(), 48000, 1, 480))
                sent += 480
        finally:
            await room.disconnect()

    def _on_track(self, track: rtc.Track, *_: object) -> None:
        async def consume() -> None:
            async for event in rtc.AudioStream(track, sample_rate=16000, num_channels=1):
                samples = np.frombuffer(event.frame.data, dtype=np.int16) / 32768.0
                self.heard_rms.append(float(np.sqrt(np.mean(samples**2))))

        self._tasks.append(asyncio.ensure_future(consume()))

    def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()


async def test_a_call_to_a_provisioned_number_reaches_a_room_with_the_agent_dispatched(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    provisioner: TelephonyProvisioner,
    tenant: str,
    tmp_path: Path,
) -> None:
    target = make_target(tenant)
    number = target.numbers[0]
    await provisioner.ensure(target, [target.claim])
    agent = FakeAgent(livekit, telephony.room_prefix(tenant, "agent") + "_")
    agent_task = asyncio.create_task(agent.run())
    result = await asyncio.to_thread(
        sipcall.place_call, "call.xml", number, tmp_path, caller="+15550001111", talk_seconds=5
    )
    agent.stop()
    await agent_task

    assert result.returncode == 0, result.describe()
    assert result.capture.responses()[-1] == 200, result.describe()
    # The answer sends the caller's ACK, BYE and RTP only to the address it dialled.
    assert result.capture.advertised_addresses() == {
        "contact": [sip.host],
        "sdp_connection": [sip.host],
        "sdp_origin": [sip.host],
    }, result.describe()
    # One room per call, named with the VoiceAgent's prefix, the agent dispatched with metadata.
    assert agent.room_name.startswith(f"call_{tenant}_agent_+15550001111_")
    assert [name for name, _ in agent.dispatched] == [target.dispatch_name]
    assert json.loads(agent.dispatched[0][1])["voiceAgent"] == f"{tenant}/agent"
    # The caller's leg carries both numbers for the runtime.
    assert agent.caller is not None
    call = PhoneCall.from_participant(agent.room_name, agent.caller)
    assert call is not None
    assert (call.caller_number, call.dialed_number) == ("+15550001111", number)
    assert agent.caller.attributes["voicefleet.dev/voiceAgent"] == f"{tenant}/agent"
    # Audio both ways: the caller's speech reached the room, the agent's tone reached the caller.
    voiced_in_room = sum(1 for rms in agent.heard_rms if rms > sipcall.SILENCE_RMS)
    assert voiced_in_room > 50, f"the room heard {voiced_in_room} voiced frames from the caller"
    assert result.capture.voiced_seconds() > 2.0, result.describe()
    # The caller hung up with a BYE that livekit-sip answered.
    assert result.capture.sent("BYE"), result.describe()


async def test_transfer_sends_the_caller_a_refer_to_the_target(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    provisioner: TelephonyProvisioner,
    tenant: str,
    tmp_path: Path,
) -> None:
    target = make_target(tenant)
    await provisioner.ensure(target, [target.claim])
    agent = FakeAgent(livekit, telephony.room_prefix(tenant, "agent") + "_")
    agent_task = asyncio.create_task(agent.run())
    call_task = asyncio.create_task(
        asyncio.to_thread(sipcall.place_call, "call_transfer.xml", target.numbers[0], tmp_path)
    )
    await asyncio.wait_for(agent.joined.wait(), timeout=30)
    assert agent.caller is not None
    # livekit-sip answers once the caller's leg subscribed to the agent's audio; a transfer
    # needs an established call.
    for _ in range(100):
        if agent.caller.attributes.get("sip.callStatus") == "active":
            break
        await asyncio.sleep(0.1)
    assert agent.caller.attributes.get("sip.callStatus") == "active"
    call = PhoneCall.from_participant(agent.room_name, agent.caller)
    controls = CallControls(
        agent.room_name, call, "+15559990000", api_factory=livekit.api, room=agent.room
    )
    # What the LLM hears back from transfer_to_human. The caller accepts the REFER (202) and
    # reports success (NOTIFY 200), so it must be success, also when livekit-sip 1.8.0 loses its
    # REFER transaction race and answers "transaction failed to complete": then the tool waits
    # for the caller's leg to leave the room (see voicefleet_runtime.telephony).
    playout = SimpleNamespace(wait_for_playout=lambda: asyncio.sleep(0))
    told = await controls._transfer_tool({"reason": "the caller asked for a person"}, playout)  # type: ignore[arg-type]
    assert told == TRANSFER_SUCCEEDED
    assert controls.transfers == ["tel:+15559990000"]
    result = await call_task
    agent.stop()
    await agent_task

    refers = result.capture.received_requests("REFER")
    assert len(refers) == 1, result.describe()
    assert re.search(r"^Refer-To:\s*<?tel:\+15559990000>?", refers[0].text, re.M | re.I), refers[
        0
    ].text
    accepted = [p for p in result.capture.sip if p.outgoing and " 202 " in p.first_line]
    assert accepted, result.describe()
    assert result.returncode == 0, result.describe()


async def test_a_number_whose_voiceagent_is_gone_is_rejected(
    sip: SipEndpoint,
    provisioner: TelephonyProvisioner,
    tenant: str,
    tmp_path: Path,
) -> None:
    target = make_target(tenant)
    await provisioner.ensure(target, [target.claim])
    await provisioner.remove(tenant, "agent")
    result = await asyncio.to_thread(
        sipcall.place_call, "call.xml", target.numbers[0], tmp_path, answer_timeout=8
    )
    # livekit-server finds no trunk and no rule for the number: livekit-sip refuses the call,
    # with a 404 or (its flood protection, livekit-server >= 1.9) by dropping it unanswered.
    finals = [code for code in result.capture.responses() if code >= 200]
    assert finals in ([], [404]), result.describe()
    assert result.answered_at is None and not result.capture.pcmu_frames(), result.describe()
    assert result.returncode != 0
