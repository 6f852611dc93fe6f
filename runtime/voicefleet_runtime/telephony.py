"""Phone calls, runtime side: who called, transfer to a human, hang up.

A call that came through livekit-sip has a SIP participant whose attributes carry the caller's
number (`sip.phoneNumber`) and the dialled number (`sip.trunkPhoneNumber`); `CallState` in
agents.py turns them into {caller_number} and {dialed_number} for instructions, and the tools
here receive them through the session's userdata.

Tools given to every agent of a call:
  end_call            the agent says goodbye, then deletes the call's room: livekit-sip sends the
                      caller a BYE and the job ends (the session closes with the room).
  transfer_to_human   only for phone calls when telephony.transferTo is set: livekit-api's
                      SipService.transfer_sip_participant makes livekit-sip send the caller a
                      SIP REFER to the target (a cold transfer); the caller's leg then leaves
                      the room and the job ends.

What the LLM is told about a transfer is what happened to the caller. livekit-sip 1.8.0 can
report a REFER the caller accepted as failed: sendRefer (pkg/sip/protocol.go) reads the answer
with sipResponse (pkg/sip/outbound.go), which selects on the transaction's Done() and Responses()
alike, so a 202 that ends the transaction may lose the race and come back as "transaction failed
to complete (0 intermediate responses)". livekit-sip then neither waits for the NOTIFY nor ends
the caller's leg, but the caller has been transferred: the NOTIFY 200 follows and the old leg goes
quiet, and it leaves the room when the caller's side hangs it up or at livekit-sip's media
timeout (15 s). On that error only (a definite refusal, a 4xx/6xx or a failed NOTIFY, leaves the
caller on the line) the tool waits for the caller's leg to leave the room, up to
TRANSFER_CONFIRM_SECONDS: gone means transferred (the tool succeeds and the call record says
transferred), still there means it did not go through.
Both talk to LiveKit with the worker's LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET.

Call seconds are counted by telemetry.CallTelemetry (voicefleet_call_seconds_total): a phone
call's job lives exactly as long as the caller's leg, because the session closes when the SIP
participant leaves (hang-up, BYE or transfer) and worker.py ends the job on that close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from livekit import api, rtc
from livekit.agents import RunContext, ToolError, function_tool
from livekit.agents.llm import RawFunctionTool
from livekit.rtc.room import EventTypes as RoomEvent

from voicefleet_runtime.admission import transfer_uri

logger = logging.getLogger("voicefleet.runtime.telephony")

SIP_CALLER_ATTRIBUTE = "sip.phoneNumber"
SIP_DIALED_ATTRIBUTE = "sip.trunkPhoneNumber"
SIP_CALL_ID_ATTRIBUTE = "sip.callID"

END_CALL_TOOL = "end_call"
TRANSFER_TOOL = "transfer_to_human"

SIP_CALL_STATUS_ATTRIBUTE = "sip.callStatus"
SIP_CALL_STATUS_HANGUP = "hangup"

ApiFactory = Callable[[], api.LiveKitAPI]
"""Makes a livekit-api client; the default reads LIVEKIT_URL, LIVEKIT_API_KEY/SECRET."""

TRANSFER_RACE_ERROR = "transaction failed to complete"
"""livekit-sip's error when the REFER transaction ended before it read the answer: the caller
may well have accepted the transfer (see the module docstring)."""
TRANSFER_CONFIRM_SECONDS = 30.0
"""How long a transfer livekit-sip could not confirm waits for the caller's leg to leave: past
livekit-sip's 15 s media timeout, which ends a transferred leg whose caller never hangs it up."""


def is_phone_participant(participant: rtc.Participant) -> bool:
    return participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_SIP


@dataclass(frozen=True)
class PhoneCall:
    """The phone-call facts of one job: its room and the caller's SIP participant."""

    room_name: str
    caller_identity: str
    caller_number: str
    dialed_number: str
    sip_call_id: str

    @classmethod
    def from_participant(cls, room_name: str, participant: rtc.Participant) -> PhoneCall | None:
        """The call if `participant` came in through SIP, else None (e.g. a WebRTC test)."""
        if not is_phone_participant(participant):
            return None
        attributes = dict(participant.attributes)
        return cls(
            room_name=room_name,
            caller_identity=participant.identity,
            caller_number=attributes.get(SIP_CALLER_ATTRIBUTE, ""),
            dialed_number=attributes.get(SIP_DIALED_ATTRIBUTE, ""),
            sip_call_id=attributes.get(SIP_CALL_ID_ATTRIBUTE, ""),
        )


END_CALL_SCHEMA: dict[str, Any] = {
    "name": END_CALL_TOOL,
    "description": (
        "Hang up. Use it only when the caller is done (they said goodbye, or asked to end the "
        "call). Say a short goodbye before calling it; nothing can be said afterwards."
    ),
    "parameters": {"type": "object", "properties": {}, "required": []},
}


def transfer_schema(target: str) -> dict[str, Any]:
    return {
        "name": TRANSFER_TOOL,
        "description": (
            "Transfer the caller to a human colleague. Use it when the caller asks for a person, "
            "or needs something you cannot do. Tell the caller you are transferring them before "
            "calling it; the call leaves you when the transfer starts."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "reason": {
                    "type": "string",
                    "description": "One sentence on why the caller needs a human.",
                }
            },
            "required": [],
        },
    }


TRANSFER_SUCCEEDED = "The caller is being transferred to a human colleague."
"""What the LLM is told when the caller took the transfer."""


class CallControls:
    """The end_call and transfer_to_human tools of one call."""

    def __init__(
        self,
        room_name: str,
        phone_call: PhoneCall | None,
        transfer_to: str | None,
        api_factory: ApiFactory = api.LiveKitAPI,
        room: rtc.Room | None = None,
        confirm_seconds: float = TRANSFER_CONFIRM_SECONDS,
    ) -> None:
        self.room_name = room_name
        self.phone_call = phone_call
        self.transfer_to = transfer_to
        self._api_factory = api_factory
        self.room = room
        """The call's room, where a transfer livekit-sip could not confirm is seen to happen."""
        self.confirm_seconds = confirm_seconds
        self.transfers: list[str] = []
        """Targets the caller was transferred to (the call record's `transferred`)."""
        self.hung_up = False
        """An agent ended the call (end_call); the call record says so."""
        self.limit_reached: Literal["max_duration", "silence_timeout"] | None = None
        """A call limit (limits.py) ended the call; the call record's endReason says which."""

    def function_tools(self) -> list[RawFunctionTool[Any, Any]]:
        tools: list[RawFunctionTool[Any, Any]] = [
            function_tool(self._end_call_tool, raw_schema=END_CALL_SCHEMA)
        ]
        if self.phone_call is not None and self.transfer_to:
            tools.append(
                function_tool(self._transfer_tool, raw_schema=transfer_schema(self.transfer_to))
            )
        return tools

    async def hang_up(self) -> None:
        """Delete the room: every participant is disconnected, a SIP caller gets a BYE."""
        # Set first: deleting the room disconnects the caller, which ends the job.
        self.hung_up = True
        async with self._api_factory() as lkapi:
            try:
                await lkapi.room.delete_room(api.DeleteRoomRequest(room=self.room_name))
            except api.TwirpError as error:
                if error.code != api.TwirpErrorCode.NOT_FOUND:
                    raise
        logger.info("hung up: room %s deleted", self.room_name)

    async def transfer(self, reason: str = "") -> api.TransferSIPParticipantResponse:
        """REFER the caller to transferTo; raises ToolError with a sayable reason on failure."""
        if self.phone_call is None or not self.transfer_to:
            raise ToolError("This call cannot be transferred.")
        target = transfer_uri(self.transfer_to)
        logger.info(
            "transferring the caller of room %s to %s",
            self.room_name,
            target,
            extra={"reason": reason},
        )
        async with self._api_factory() as lkapi:
            try:
                response = await lkapi.sip.transfer_sip_participant(
                    api.TransferSIPParticipantRequest(
                        room_name=self.room_name,
                        participant_identity=self.phone_call.caller_identity,
                        transfer_to=target,
                        play_dialtone=False,
                    )
                )
            except api.TwirpError as error:
                if TRANSFER_RACE_ERROR in error.message and await self._caller_left(target):
                    logger.info(
                        "transfer to %s: livekit-sip reported %r, but the caller's leg left the "
                        "room: the caller took the transfer",
                        target,
                        error.message,
                    )
                    return api.TransferSIPParticipantResponse()
                logger.warning("transfer to %s failed: %s", target, error)
                raise ToolError(
                    "The transfer did not go through; apologise and offer to help further."
                ) from error
        self.transfers.append(target)
        return response

    def _caller_gone(self) -> bool:
        assert self.room is not None and self.phone_call is not None
        caller = self.room.remote_participants.get(self.phone_call.caller_identity)
        return (
            caller is None
            or caller.attributes.get(SIP_CALL_STATUS_ATTRIBUTE) == SIP_CALL_STATUS_HANGUP
        )

    async def _caller_left(self, target: str) -> bool:
        """Whether the caller's leg leaves the room (or hangs up) within confirm_seconds; the
        transfer is recorded the moment it does, before the job's shutdown reads it."""
        if self.room is None or self.phone_call is None:
            return False
        left = asyncio.Event()

        def check(*_: object) -> None:
            if not left.is_set() and self._caller_gone():
                self.transfers.append(target)
                left.set()

        events: tuple[RoomEvent, ...] = (
            "participant_disconnected",
            "participant_attributes_changed",
        )
        for event in events:
            self.room.on(event, check)
        try:
            check()
            logger.info(
                "transfer to %s unconfirmed by livekit-sip; waiting up to %.0f s for the "
                "caller's leg to leave",
                target,
                self.confirm_seconds,
            )
            try:
                await asyncio.wait_for(left.wait(), self.confirm_seconds)
            except TimeoutError:
                return False
            return True
        finally:
            for event in events:
                self.room.off(event, check)

    async def hang_up_at_limit(self, reason: Literal["max_duration", "silence_timeout"]) -> None:
        """The call limits' hang-up: recorded as the limit, not as the agent's end_call."""
        self.limit_reached = reason
        await self.hang_up()

    async def _end_call_tool(self, raw_arguments: dict[str, Any], context: RunContext) -> None:
        # Let the goodbye said before this call finish playing, then hang up.
        await context.wait_for_playout()
        await self.hang_up()

    async def _transfer_tool(self, raw_arguments: dict[str, Any], context: RunContext) -> str:
        await context.wait_for_playout()
        await self.transfer(str(raw_arguments.get("reason", "")))
        return TRANSFER_SUCCEEDED
