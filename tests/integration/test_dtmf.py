"""spec.dtmf on a phone call: sipp -> livekit-sip -> a worker process, against a real
livekit-server and the local provider servers.

sipp (sipp/call_dtmf.xml) listens to the greeting, then presses 1 2 3 4 # (RFC 2833 / RFC 4733
telephone-events on its RTP): the agent's LLM request carries them as a caller message. The
scripted LLM answers with the send_dtmf tool (9 8 7 #): livekit-sip sends those keys to sipp as
telephone-events, which the wire capture decodes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_runtime.dtmf import SEND_DTMF_TOOL, caller_message
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall
from voicefleet_testkit.providers.script import last_user_text

from tests.integration.test_runtime_worker import (
    RuntimeWorker,
    Webhooks,
    chat_messages,
    runtime_config,
    tool_names,
)
from tests.integration.test_telephony import call_a_fresh_number

pytestmark = pytest.mark.integration

PRESSED = "1234#"
"""What sipp/call_dtmf.xml presses (its play_dtmf)."""
SENT = "987#"


@pytest.fixture
async def webhooks() -> Any:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


async def test_caller_keys_reach_the_llm_and_the_agent_presses_keys_back(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"dtmf-{uuid.uuid4().hex[:6]}"
    config = runtime_config(dispatch_name, providers.base_url, webhooks.url)
    config["dtmf"] = {"interDigitTimeoutSeconds": 2.0, "terminator": "#"}
    providers.script_llm(
        LLMReply(
            "Thanks. Entering the extension now.",
            tool_calls=[ToolCall(SEND_DTMF_TOOL, {"digits": SENT})],
            match=PRESSED,
        ),
        LLMReply("Done.", after="tool"),
    )
    worker = RuntimeWorker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        _, result = await call_a_fresh_number(
            livekit,
            sip,
            dispatch_name,
            "call_dtmf.xml",
            tmp_path / "sipp",
            talk_seconds=14,
            speech="Hello.",
            speech_delay=60.0,  # a caller who only listens and presses keys
        )
        assert result.returncode == 0, result.describe()
        assert result.answered_at is not None, result.describe()

        # The caller's keys reached the LLM, as one caller message.
        requests = providers.requests("chat")
        with_keys = [
            r for r in requests if caller_message(PRESSED) in last_user_text(chat_messages(r))
        ]
        assert with_keys, [last_user_text(chat_messages(r)) for r in requests]
        assert SEND_DTMF_TOOL in tool_names(with_keys[0])
        # The agent's send_dtmf made livekit-sip press the keys towards sipp (RFC 4733).
        payload_type = result.capture.telephone_event_payload_type()
        assert payload_type is not None, result.describe()
        assert result.capture.dtmf_digits() == SENT, (
            f"telephone-events seen: {result.capture.events[:40]}\n{worker.log_tail()}"
        )
        assert "sent DTMF 987#" in worker.log()
        events = [e for e in result.capture.events if e.payload_type == payload_type]
        figures = {
            "telephone_event_payload_type": payload_type,
            "telephone_event_packets": len(events),
            "first_to_last_key_s": round(events[-1].at - events[0].at, 2),
        }
        print("dtmf measurements:", json.dumps(figures))
        for key, value in figures.items():
            record_property(key, value)
    finally:
        await worker.stop()
