"""spec.callLimits: validation naming the field, rendering, end reasons, and the limiter's
behaviour against a stand-in session (the real one is in tests/integration/test_call_limits.py)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator.api import SpecError, parse_spec
from voicefleet_operator.render import VoiceAgentRef, runtime_config
from voicefleet_runtime.callrecords import END_REASONS, EndReason
from voicefleet_runtime.config import CallLimitsConfig
from voicefleet_runtime.limits import CallLimiter, LimitReason
from voicefleet_runtime.recorder import end_reason

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
REF = VoiceAgentRef(name="acme-support", namespace="acme", uid="u-1")


def spec_with(limits: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    spec["callLimits"] = limits
    return spec


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            {"maxDurationSeconds": 40},
            "spec.callLimits: maxDurationSeconds (40) must be at least warnBeforeSeconds (30) + 15",
        ),
        (
            {"maxDurationSeconds": 30, "warnBeforeSeconds": 20},
            "maxDurationSeconds (30) must be at least warnBeforeSeconds (20) + 15",
        ),
        ({"maxDurationSeconds": 10}, "spec.callLimits.maxDurationSeconds"),
        ({"warnBeforeSeconds": 2}, "spec.callLimits.warnBeforeSeconds"),
        ({"silenceTimeoutSeconds": 1}, "spec.callLimits.silenceTimeoutSeconds"),
        ({"silencePrompt": ""}, "spec.callLimits.silencePrompt"),
        ({"maxDurationSecond": 60}, "spec.callLimits.maxDurationSecond: unknown field"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(limits: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec_with(limits))
    assert expected in str(raised.value)


def test_the_floor_is_warn_before_plus_fifteen() -> None:
    assert parse_spec(spec_with({"maxDurationSeconds": 45})).call_limits == CallLimitsConfig(
        max_duration_seconds=45
    )
    limits = parse_spec(spec_with({"maxDurationSeconds": 20, "warnBeforeSeconds": 5})).call_limits
    assert limits is not None
    assert (limits.max_duration_seconds, limits.warn_before_seconds) == (20, 5)
    assert limits.warning_text().endswith("in about 5 seconds.")


def test_limits_reach_the_runtime_config_only_when_set() -> None:
    spec = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    plain = runtime_config(REF, parse_spec(spec))
    assert "callLimits" not in plain.wire() and plain.call_limits is None
    limited = runtime_config(
        REF, parse_spec(spec_with({"maxDurationSeconds": 600, "silenceTimeoutSeconds": 20}))
    )
    assert limited.call_limits is not None
    assert limited.call_limits.max_duration_seconds == 600
    assert limited.call_limits.silence_timeout_seconds == 20


def test_end_reasons_are_documented_and_win_over_the_hang_up() -> None:
    reasons: list[EndReason] = ["max_duration", "silence_timeout"]
    for reason in reasons:
        assert reason in END_REASONS
        assert (
            end_reason("participant_disconnected", "", hung_up_by_agent=True, limit_reached=reason)
            == reason
        )
    assert end_reason("participant_disconnected", "", hung_up_by_agent=True) == "agent_ended"


def test_silence_timeout_is_the_sessions_user_away_timeout() -> None:
    assert CallLimiter.user_away_timeout(CallLimitsConfig(silence_timeout_seconds=8), 15.0) == 8
    assert CallLimiter.user_away_timeout(CallLimitsConfig(), 15.0) == 15.0
    assert CallLimiter.user_away_timeout(CallLimitsConfig(), None) is None


# --- the limiter against a stand-in session ---------------------------------------------------


class Handle:
    async def wait_for_playout(self) -> None:
        await asyncio.sleep(0)


class FakeSession:
    def __init__(self) -> None:
        self.said: list[tuple[str, bool]] = []
        self.interrupted = 0
        self.user_state = "listening"
        self.tts = object()  # a pipeline with TTS: lines are said with say()
        self.handlers: dict[str, list[Callable[[Any], None]]] = {}

    def on(self, event: str, handler: Callable[[Any], None]) -> None:
        self.handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Callable[[Any], None]) -> None:
        if handler in self.handlers.get(event, []):
            self.handlers[event].remove(handler)

    def emit(self, event: str, payload: Any) -> None:
        for handler in list(self.handlers.get(event, [])):
            handler(payload)

    def say(self, text: str, allow_interruptions: bool = True) -> Handle:
        self.said.append((text, allow_interruptions))
        return Handle()

    def interrupt(self, force: bool = False) -> asyncio.Future[None]:
        self.interrupted += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def set_user_state(self, state: str) -> None:
        old, self.user_state = self.user_state, state
        self.emit("user_state_changed", type("E", (), {"old_state": old, "new_state": state})())


def limiter(limits: CallLimitsConfig) -> tuple[CallLimiter, FakeSession, list[LimitReason]]:
    session = FakeSession()
    hung_up: list[LimitReason] = []

    async def hang_up(reason: LimitReason) -> None:
        hung_up.append(reason)
        session.emit("close", None)

    return CallLimiter(limits, session, hang_up), session, hung_up  # type: ignore[arg-type]


async def until(done: Callable[[], bool]) -> None:
    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_max_duration_warns_then_ends_politely() -> None:
    limits = CallLimitsConfig.model_construct(
        **{
            **CallLimitsConfig().model_dump(),
            "max_duration_seconds": 0.3,
            "warn_before_seconds": 0.2,
        }
    )
    guard, session, hung_up = limiter(limits)
    guard.start()
    await until(lambda: bool(hung_up))
    assert hung_up == ["max_duration"]
    assert [text for text, _ in session.said] == [limits.warning_text(), limits.end_message]
    assert all(not interruptible for _, interruptible in session.said)
    assert session.interrupted == 1 and guard.ending == "max_duration"


async def test_a_silent_caller_is_prompted_then_hung_up() -> None:
    limits = CallLimitsConfig.model_construct(
        **{**CallLimitsConfig().model_dump(), "silence_timeout_seconds": 0.05}
    )
    guard, session, hung_up = limiter(limits)
    guard.start()
    session.set_user_state("away")
    await until(lambda: bool(hung_up))
    assert hung_up == ["silence_timeout"]
    assert [text for text, _ in session.said] == [limits.silence_prompt, limits.silence_end_message]


async def test_a_caller_who_answers_the_prompt_stays_on_the_line() -> None:
    limits = CallLimitsConfig.model_construct(
        **{**CallLimitsConfig().model_dump(), "silence_timeout_seconds": 0.3}
    )
    guard, session, hung_up = limiter(limits)
    guard.start()
    session.set_user_state("away")
    await until(lambda: guard.prompted == 1 and bool(session.said))
    session.set_user_state("speaking")  # the caller answers
    session.set_user_state("listening")
    # The next silence starts over with a new prompt, not the hang-up.
    session.set_user_state("away")
    await until(lambda: len(session.said) == 2)
    assert [text for text, _ in session.said] == [limits.silence_prompt, limits.silence_prompt]
    await until(lambda: bool(hung_up))
    assert hung_up == ["silence_timeout"]
    guard.stop()
