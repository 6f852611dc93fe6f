"""Phone keypad digits (spec.dtmf), both ways, on phone calls.

Receiving. livekit-sip turns the caller's RFC 4733 telephone-events (RFC 2833 DTMF) into SIP
DTMF data packets in the room; livekit rtc raises them as the room's `sip_dtmf_received`
(SipDTMF: code, digit, participant). The digits of the call's SIP participant are gathered until
the caller pauses for interDigitTimeoutSeconds or presses the terminator, then handed to the
session as one caller message (`generate_reply(user_input=...)`): the LLM sees
`[The caller pressed the phone keys: 1234#]`, and the call record's transcript has it as a
caller turn. A key press interrupts the agent's speech first (dtmf.interrupt), as in phone menus.
(livekit-agents' RoomIO also restarts the user-away timer on each key: a caller typing a PIN is
not silent.)

Sending. The `send_dtmf` tool publishes each digit with `LocalParticipant.publish_dtmf(code,
digit)` (what livekit-agents' beta `send_dtmf_events` tool does, with the same 0.3 s between
digits); livekit-sip sends it to the caller's side as RFC 4733 events on the call's RTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession, RunContext, ToolError, function_tool
from livekit.agents.llm import RawFunctionTool
from livekit.rtc.participant import PublishDTMFError

from voicefleet_runtime.config import DTMF_DIGITS, DtmfConfig

logger = logging.getLogger("voicefleet.runtime.dtmf")

SEND_DTMF_TOOL = "send_dtmf"
DIGIT_GAP_SECONDS = 0.3
"""Pause between sent digits (livekit-agents' DEFAULT_DTMF_PUBLISH_DELAY): a receiver needs a
gap to tell two equal digits apart."""
DTMF_CODES = {
    **{str(d): d for d in range(10)},
    "*": 10,
    "#": 11,
    "A": 12,
    "B": 13,
    "C": 14,
    "D": 15,
}
"""RFC 4733 event codes of the keypad digits."""


def caller_message(digits: str) -> str:
    """What the LLM sees for the keys a caller pressed."""
    return f"[The caller pressed the phone keys: {digits}]"


SEND_DTMF_SCHEMA: dict[str, Any] = {
    "name": SEND_DTMF_TOOL,
    "description": (
        "Press keys on the phone keypad during this call (DTMF tones), e.g. to choose an option "
        "in a phone menu or to enter a number. Digits 0-9, * and #, in order."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "digits": {
                "type": "string",
                "description": "The keys to press, in order, e.g. '1' or '1234#'.",
            }
        },
        "required": ["digits"],
    },
}


class DtmfReceiver:
    """Gathers the caller's key presses and hands them to the session."""

    def __init__(
        self,
        config: DtmfConfig,
        session: AgentSession[Any],
        room: rtc.Room,
        caller_identity: str,
    ) -> None:
        self.config = config
        self.session = session
        self.room = room
        self.caller_identity = caller_identity
        self.pressed: list[str] = []
        """Entries handed to the LLM during the call, in order."""
        self._digits: list[str] = []
        self._flush: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.room.on("sip_dtmf_received", self._on_dtmf)
        self.session.on("close", lambda _event: self.stop())

    def stop(self) -> None:
        self.room.off("sip_dtmf_received", self._on_dtmf)
        if self._flush is not None:
            self._flush.cancel()

    def _on_dtmf(self, event: rtc.SipDTMF) -> None:
        if event.participant is None or event.participant.identity != self.caller_identity:
            return
        digit = event.digit or next((d for d, c in DTMF_CODES.items() if c == event.code), "")
        if not digit:
            return
        logger.info("caller pressed %r", digit)
        if self.config.interrupt and not self._digits:
            with contextlib.suppress(RuntimeError):
                self.session.interrupt()
        self._digits.append(digit)
        if self._flush is not None:
            self._flush.cancel()
        if digit == self.config.terminator:
            self.flush()
        else:
            self._flush = asyncio.get_running_loop().call_later(
                self.config.inter_digit_timeout_seconds, self.flush
            )

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._digits:
            return
        digits = "".join(self._digits)
        self._digits.clear()
        self.pressed.append(digits)
        logger.info("caller's keys to the LLM: %s", digits)
        try:
            self.session.generate_reply(user_input=caller_message(digits))
        except RuntimeError:
            logger.warning("could not hand the caller's keys to the agent", exc_info=True)


class DtmfSender:
    """The send_dtmf tool of one phone call."""

    def __init__(self, room: rtc.Room, gap_seconds: float = DIGIT_GAP_SECONDS) -> None:
        self.room = room
        self.gap_seconds = gap_seconds
        self.sent: list[str] = []

    def function_tools(self) -> list[RawFunctionTool[Any, Any]]:
        return [function_tool(self._tool, raw_schema=SEND_DTMF_SCHEMA)]

    async def send(self, digits: str) -> None:
        if not re.fullmatch(DTMF_DIGITS, digits):
            raise ToolError(
                f"{digits!r} is not a sequence of keypad digits (0-9, *, #, A-D; at most 32)."
            )
        for index, digit in enumerate(digits):
            if index:
                await asyncio.sleep(self.gap_seconds)
            try:
                await self.room.local_participant.publish_dtmf(code=DTMF_CODES[digit], digit=digit)
            except PublishDTMFError as error:
                logger.warning("sending DTMF %r failed: %s", digit, error)
                raise ToolError(f"The keys could not be pressed ({digits[:index]} sent).") from None
        self.sent.append(digits)
        logger.info("sent DTMF %s", digits)

    async def _tool(self, raw_arguments: dict[str, Any], context: RunContext) -> str:
        digits = str(raw_arguments.get("digits", "")).strip().replace(" ", "")
        # What the agent said before pressing the keys goes out first.
        await context.wait_for_playout()
        await self.send(digits)
        return f"Pressed {digits}."
