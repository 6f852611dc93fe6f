"""spec.dtmf: refused without telephony (naming the field), rendered into the runtime config,
and the runtime's receiver and sender against stand-ins (the real call is in
tests/integration/test_dtmf.py)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from livekit.agents import ToolError
from voicefleet_operator.api import SPEC_RULES, SpecError, parse_spec
from voicefleet_operator.render import VoiceAgentRef, runtime_config
from voicefleet_runtime.config import DtmfConfig
from voicefleet_runtime.dtmf import DTMF_CODES, DtmfReceiver, DtmfSender, caller_message

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
REF = VoiceAgentRef(name="acme-support", namespace="acme", uid="u-1")


def example_spec() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])


def test_dtmf_without_telephony_is_refused_naming_the_field() -> None:
    spec = example_spec()
    spec.pop("telephony", None)
    spec["dtmf"] = {}
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    assert "spec.dtmf: DTMF (phone keypad digits) needs phone calls" in str(raised.value)
    [rule] = [r for r in SPEC_RULES if r.get("fieldPath") == ".dtmf"]
    assert rule["rule"] == "!has(self.dtmf) || has(self.telephony)"


@pytest.mark.parametrize(
    ("dtmf", "expected"),
    [
        ({"terminator": "0"}, "spec.dtmf.terminator"),
        ({"interDigitTimeoutSeconds": 0}, "spec.dtmf.interDigitTimeoutSeconds"),
        ({"sendTools": True}, "spec.dtmf.sendTools: unknown field"),
    ],
)
def test_bad_dtmf_settings_name_the_field(dtmf: dict[str, Any], expected: str) -> None:
    spec = example_spec()
    assert spec.get("telephony")
    spec["dtmf"] = dtmf
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    assert expected in str(raised.value)


def test_dtmf_reaches_the_runtime_config_only_when_set() -> None:
    spec = example_spec()
    assert runtime_config(REF, parse_spec(spec)).dtmf is None
    spec["dtmf"] = {"terminator": "none", "interDigitTimeoutSeconds": 1.5}
    config = runtime_config(REF, parse_spec(spec))
    assert config.dtmf == DtmfConfig(terminator="none", inter_digit_timeout_seconds=1.5)


# --- receiver and sender -----------------------------------------------------------------


class FakeRoom:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.published: list[tuple[int, str]] = []
        self.local_participant = self

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    def off(self, event: str, handler: Any) -> None:
        self.handlers.pop(event, None)

    def press(self, digit: str, identity: str = "sip-caller") -> None:
        participant = SimpleNamespace(identity=identity)
        self.handlers["sip_dtmf_received"](
            SimpleNamespace(code=DTMF_CODES[digit], digit=digit, participant=participant)
        )

    async def publish_dtmf(self, *, code: int, digit: str) -> None:
        self.published.append((code, digit))


class FakeSession:
    def __init__(self) -> None:
        self.replies: list[str] = []
        self.interrupts = 0

    def on(self, event: str, handler: Any) -> None:
        pass

    def interrupt(self) -> None:
        self.interrupts += 1

    def generate_reply(self, *, user_input: str) -> None:
        self.replies.append(user_input)


async def test_digits_are_gathered_until_the_terminator() -> None:
    room, session = FakeRoom(), FakeSession()
    receiver = DtmfReceiver(DtmfConfig(inter_digit_timeout_seconds=5), session, room, "sip-caller")  # type: ignore[arg-type]
    receiver.start()
    for digit in "12":
        room.press(digit)
    room.press("9", identity="someone-else")  # not the caller: ignored
    room.press("#")
    assert session.replies == [caller_message("12#")]
    assert session.interrupts == 1  # once per entry


async def test_digits_are_handed_over_after_a_pause() -> None:
    room, session = FakeRoom(), FakeSession()
    config = DtmfConfig(inter_digit_timeout_seconds=0.3, terminator="none", interrupt=False)
    DtmfReceiver(config, session, room, "sip-caller").start()  # type: ignore[arg-type]
    for digit in "42*":
        room.press(digit)
    for _ in range(200):
        if session.replies:
            break
        await asyncio.sleep(0.01)
    assert session.replies == [caller_message("42*")] and session.interrupts == 0


async def test_the_sender_publishes_each_digit_with_its_code() -> None:
    room = FakeRoom()
    sender = DtmfSender(room, gap_seconds=0)  # type: ignore[arg-type]
    await sender.send("9*#0")
    assert room.published == [(9, "9"), (10, "*"), (11, "#"), (0, "0")]
    with pytest.raises(ToolError):
        await sender.send("12x")
    assert sender.sent == ["9*#0"]
