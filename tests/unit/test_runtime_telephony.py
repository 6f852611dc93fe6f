"""transfer_to_human tells the LLM what happened to the caller, also when livekit-sip 1.8.0
reports a REFER the caller accepted as failed (its transaction race): then the caller's leg
leaving the room is the answer. The real round trip (sipp through livekit-sip) is in
tests/integration/test_telephony.py; here LiveKit's answer and the room's events are scripted so
that each path runs every time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from livekit import api, rtc
from livekit.agents import ToolError
from voicefleet_runtime.telephony import (
    SIP_CALL_STATUS_ATTRIBUTE,
    TRANSFER_SUCCEEDED,
    CallControls,
    PhoneCall,
)

CALLER = "sip_+15550001111"
RACE = "transaction failed to complete (0 intermediate responses)"


class ScriptedLiveKit:
    """Answers transfer_sip_participant with `error` (or success) and records the requests."""

    def __init__(self, error: api.TwirpError | None) -> None:
        self.error = error
        self.requests: list[api.TransferSIPParticipantRequest] = []
        self.sip = self

    async def __aenter__(self) -> ScriptedLiveKit:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def transfer_sip_participant(
        self, request: api.TransferSIPParticipantRequest
    ) -> api.TransferSIPParticipantResponse:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return api.TransferSIPParticipantResponse()


class CallRoom(rtc.EventEmitter[Any]):
    """The part of rtc.Room the transfer reads: remote participants and their events."""

    def __init__(self) -> None:
        super().__init__()
        self.caller = SimpleNamespace(identity=CALLER, attributes={"sip.callStatus": "active"})
        self.remote_participants: dict[str, Any] = {CALLER: self.caller}
        self.watched = asyncio.Event()
        """Set when someone starts watching for the caller to leave."""

    def on(self, event: str, callback: Any = None) -> Any:
        registered = super().on(event, callback)
        if event == "participant_disconnected":
            self.watched.set()
        return registered

    def listening(self) -> bool:
        return bool(self._events.get("participant_disconnected"))

    def caller_leaves(self) -> None:
        del self.remote_participants[CALLER]
        self.emit("participant_disconnected", self.caller)


def controls(error: api.TwirpError | None, room: CallRoom, confirm: float = 30) -> CallControls:
    lk = ScriptedLiveKit(error)
    call = PhoneCall("room", CALLER, "+15550001111", "+15557435191", "call-id")
    return CallControls(
        "room",
        call,
        "+15559990000",
        api_factory=lambda: lk,  # type: ignore[arg-type,return-value]
        room=room,  # type: ignore[arg-type]
        confirm_seconds=confirm,
    )


def race() -> api.TwirpError:
    return api.TwirpError("canceled", RACE, status=408)


async def until_listening(room: CallRoom, transfer: asyncio.Task[Any]) -> None:
    """Until the transfer watches the room for the caller to leave (failing, not hanging, if
    the transfer ends without doing so)."""
    watched = asyncio.create_task(room.watched.wait())
    await asyncio.wait([watched, transfer], return_when=asyncio.FIRST_COMPLETED)
    watched.cancel()
    assert not transfer.done(), transfer
    assert room.listening()


async def test_an_unconfirmed_transfer_succeeds_once_the_caller_leaves() -> None:
    room = CallRoom()
    call_controls = controls(race(), room)
    transfer = asyncio.create_task(call_controls.transfer("asked for a person"))
    await until_listening(room, transfer)
    assert call_controls.transfers == []
    room.caller_leaves()
    # Recorded at the event itself, before the job's shutdown could read it.
    assert call_controls.transfers == ["tel:+15559990000"]
    await transfer
    assert not room.listening()


async def test_an_unconfirmed_transfer_succeeds_when_the_caller_leg_hangs_up() -> None:
    room = CallRoom()
    call_controls = controls(race(), room)
    transfer = asyncio.create_task(call_controls.transfer())
    await until_listening(room, transfer)
    room.caller.attributes = {SIP_CALL_STATUS_ATTRIBUTE: "hangup"}
    room.emit("participant_attributes_changed", {}, room.caller)
    await transfer
    assert call_controls.transfers == ["tel:+15559990000"]


async def test_an_unconfirmed_transfer_fails_while_the_caller_stays() -> None:
    room = CallRoom()
    call_controls = controls(race(), room, confirm=0.2)
    with pytest.raises(ToolError, match="did not go through"):
        await call_controls.transfer()
    assert call_controls.transfers == []
    assert not room.listening()


async def test_a_definite_refusal_fails_even_if_the_caller_is_gone() -> None:
    """A 603 (or a failed NOTIFY) is livekit-sip's answer, not the race: no waiting for the leg."""
    room = CallRoom()
    del room.remote_participants[CALLER]
    declined = api.TwirpError("unavailable", "call transfer failed: 603 Declined", status=503)
    call_controls = controls(declined, room)
    with pytest.raises(ToolError, match="did not go through"):
        await call_controls.transfer()
    assert call_controls.transfers == []


async def test_the_llm_is_told_success_by_the_tool() -> None:
    room = CallRoom()
    call_controls = controls(race(), room)
    context = SimpleNamespace(wait_for_playout=lambda: asyncio.sleep(0))
    answer = asyncio.create_task(
        call_controls._transfer_tool({"reason": "asked"}, context)  # type: ignore[arg-type]
    )
    await until_listening(room, answer)
    room.caller_leaves()
    assert await answer == TRANSFER_SUCCEEDED


async def test_a_confirmed_transfer_needs_no_room() -> None:
    call_controls = controls(None, CallRoom())
    call_controls.room = None
    await call_controls.transfer()
    assert call_controls.transfers == ["tel:+15559990000"]
