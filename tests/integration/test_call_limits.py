"""spec.callLimits against a real livekit-server: a worker process (`python -m voicefleet_runtime
start`), a WebRTC caller (livekit rtc SDK), the local provider servers and a call-record receiver.

- a call that reaches maxDurationSeconds: the caller hears the warning warnBeforeSeconds before
  the end, then the end message, the room is closed and the record says max_duration;
- a caller who says nothing: prompted after silenceTimeoutSeconds, hung up after as long again,
  and the record says silence_timeout.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from livekit import api
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_runtime.config import CallLimitsConfig
from voicefleet_testkit.providers import ProviderServer
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_call_records import (
    Receiver,
    check_signed,
    records_config,
    records_worker,
)
from tests.integration.test_runtime_worker import (
    GREETING,
    RuntimeWorker,
    Webhooks,
    dispatched_call,
)

pytestmark = pytest.mark.integration

MAX_DURATION_S = 24
WARN_BEFORE_S = 8
SILENCE_TIMEOUT_S = 5.0
LIMITS = CallLimitsConfig(
    max_duration_seconds=MAX_DURATION_S,
    warn_before_seconds=WARN_BEFORE_S,
    silence_timeout_seconds=SILENCE_TIMEOUT_S,
)
"""The duration test's worker (a talkative caller never reaches the silence timeout)."""
SILENCE_ONLY = CallLimitsConfig(silence_timeout_seconds=SILENCE_TIMEOUT_S)
"""The silence test's worker: on a loaded machine greeting, prompt and goodbye can outlast a
short maximum duration, whose warning would then come in between."""
WARNING = LIMITS.warning_text()


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.up()
    yield server
    await server.down()


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


@pytest_asyncio.fixture
async def limited_worker(
    request: pytest.FixtureRequest,
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
) -> AsyncIterator[RuntimeWorker]:
    dispatch_name = f"limits-{uuid.uuid4().hex[:6]}"
    config: dict[str, Any] = records_config(
        dispatch_name, providers.base_url, webhooks.url, receiver
    )
    limits: CallLimitsConfig = getattr(request, "param", LIMITS)
    config["callLimits"] = limits.wire()
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        yield worker
    finally:
        await worker.stop()


async def room_exists(livekit: LiveKitEndpoint, room: str) -> bool:
    async with livekit.api() as lkapi:
        rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room]))
    return bool(rooms.rooms)


def report(record_property: Callable[[str, object], None], **figures: object) -> None:
    print("call limits measurements:", json.dumps(figures))
    for key, value in figures.items():
        record_property(key, value)


async def test_a_call_at_its_maximum_duration_is_warned_then_ended(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    receiver: Receiver,
    limited_worker: RuntimeWorker,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = limited_worker.config["dispatchName"]
    async with dispatched_call(livekit, dispatch_name) as call:
        await call.wait_for_greeting()
        session_started = call.greeting_at
        caller = call.caller
        # A talkative caller: never silent long enough for the silence timeout.
        questions = 0
        while not any(WARNING.lower() in text.lower() for text in caller.said()):
            await call.ask("Tell me more about my order please.")
            questions += 1
            assert questions < 10, caller.said()
        warning = await caller.wait_for_transcript("we need to wrap up", timeout_s=5)
        goodbye = await caller.wait_for_transcript(
            "reached the time limit", timeout_s=MAX_DURATION_S
        )
        room = call.room
        await wait_until(
            "the caller disconnected: the agent closed the room",
            lambda: not caller.room.isconnected(),
            30,
            describe=limited_worker.log_tail,
        )
    assert not await room_exists(livekit, room)
    await wait_until(
        "the call's record",
        lambda: bool(receiver.records_for(room)),
        30,
        describe=limited_worker.log_tail,
    )
    [delivery] = receiver.records_for(room).values()
    record = check_signed(delivery)
    assert record.end_reason == "max_duration", record.end_detail
    said = [(turn.speaker, turn.text) for turn in record.transcript]
    agent_lines = [text for speaker, text in said if speaker == "agent"]
    assert agent_lines[0] == GREETING
    assert WARNING in agent_lines and LIMITS.end_message in agent_lines, said
    assert agent_lines.index(WARNING) < agent_lines.index(LIMITS.end_message)
    assert warning.at < goodbye.at
    report(
        record_property,
        greeting_to_warning_s=round(warning.at - session_started, 2),
        greeting_to_end_message_s=round(goodbye.at - session_started, 2),
        record_duration_s=record.duration_seconds,
        caller_questions=questions,
    )


@pytest.mark.parametrize("limited_worker", [SILENCE_ONLY], indirect=True, ids=["silence"])
async def test_a_silent_caller_is_prompted_then_hung_up(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    receiver: Receiver,
    limited_worker: RuntimeWorker,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = limited_worker.config["dispatchName"]
    chat_requests = len(providers.requests("chat"))
    async with dispatched_call(livekit, dispatch_name) as call:
        await call.wait_for_greeting()
        caller = call.caller
        prompt = await caller.wait_for_transcript(LIMITS.silence_prompt, timeout_s=30)
        goodbye = await caller.wait_for_transcript("end the call now", timeout_s=30)
        room = call.room
        hung_up_seen = time.monotonic()
        await wait_until(
            "the caller disconnected: the agent closed the room",
            lambda: not caller.room.isconnected(),
            30,
            describe=limited_worker.log_tail,
        )
    assert not await room_exists(livekit, room)
    await wait_until(
        "the call's record",
        lambda: bool(receiver.records_for(room)),
        30,
        describe=limited_worker.log_tail,
    )
    [delivery] = receiver.records_for(room).values()
    record = check_signed(delivery)
    assert record.end_reason == "silence_timeout", record.end_detail
    said = [(turn.speaker, turn.text) for turn in record.transcript]
    assert not [text for speaker, text in said if speaker == "caller"], said
    agent_lines = [text for speaker, text in said if speaker == "agent"]
    assert agent_lines == [GREETING, LIMITS.silence_prompt, LIMITS.silence_end_message], said
    # No LLM turn was spent on the silence.
    assert len(providers.requests("chat")) == chat_requests, providers.requests("chat")
    report(
        record_property,
        greeting_to_prompt_s=round(prompt.at - call.greeting_at, 2),
        prompt_to_goodbye_s=round(goodbye.at - prompt.at, 2),
        record_duration_s=record.duration_seconds,
        goodbye_seen_to_room_gone_s=round(time.monotonic() - hung_up_seen, 2),
    )
