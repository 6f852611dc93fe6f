"""spec.pipeline.realtime against a real livekit-server: a worker process whose agent is an
openai.realtime.RealtimeModel talking over the network to the local provider server's OpenAI
Realtime WebSocket endpoint (voicefleet_testkit.providers.openai_realtime_server), and a WebRTC
caller (livekit rtc SDK).

The greeting is heard, the caller's question is heard by the model (server VAD on the caller's
audio), the model calls the tenant's webhook tool and speaks the answer; the model got the
agent's instructions and tools, and usage is counted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import (
    BILLING_INSTRUCTIONS,
    GREETING,
    ORDERS_TOKEN,
    RuntimeWorker,
    Webhooks,
    dispatched_call,
    runtime_config,
    sample_values,
)
from tests.integration.test_telephony import call_a_fresh_number

pytestmark = pytest.mark.integration

QUESTION = "Where is my order A-1234?"
ANSWER = "Your order A-1234 has shipped."
BILLING_QUESTION = "And I have a question about my invoice."
BILLING_OPENING = "Billing here, I can see your invoice."


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


def realtime_config(
    dispatch_name: str, providers: ProviderServer, webhook_url: str
) -> dict[str, Any]:
    config = runtime_config(dispatch_name, providers.base_url, webhook_url)
    config["pipeline"] = {
        "realtime": {
            "baseUrl": providers.base_url,
            "voice": "alloy",
            "turnDetection": {"type": "server_vad", "silenceDurationMs": 600},
        },
        "turnDetection": {"mode": "vad"},
    }
    return config


async def test_a_realtime_agent_greets_answers_and_calls_a_tool(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"realtime-{uuid.uuid4().hex[:6]}"
    config = realtime_config(dispatch_name, providers, webhooks.url)
    providers.script_transcripts(QUESTION, BILLING_QUESTION)
    providers.script_llm(
        LLMReply(GREETING),  # the greeting: the model is asked to say it as written
        LLMReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-1234"})], match="order"),
        LLMReply(ANSWER, after="tool"),
        LLMReply(
            tool_calls=[ToolCall("transfer_to_billing", {"reason": "invoice"})], match="invoice"
        ),
        LLMReply(BILLING_OPENING, match="invoice"),  # the billing agent's opening
    )
    worker = RuntimeWorker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        async with dispatched_call(livekit, dispatch_name) as call:
            greeting_s = await call.wait_for_greeting()
            reply_at = await call.ask(QUESTION)
            turn_s = round(reply_at - call.caller.phrases[-1].ended_at, 2)
            await call.caller.wait_for_transcript("has shipped", timeout_s=30)
            # A handoff on the realtime model keeps the conversation.
            await call.caller.say(BILLING_QUESTION)
            await call.caller.wait_for_transcript("Billing here", timeout_s=30)
            said = call.caller.said()
        assert GREETING in said and ANSWER in said, said
        [hook] = [c for c in webhooks.calls if c["path"] == "/orders"]
        assert hook["body"] == {"order_id": "A-1234"}
        assert hook["headers"]["Authorization"] == ORDERS_TOKEN
        requests = providers.requests("realtime")
        receptionist = [r for r in requests if "receptionist of Acme" in r["instructions"]]
        assert receptionist and all("lookup_order" in r["tools"] for r in receptionist), requests
        assert requests[0] == receptionist[0]
        assert any(m.get("content") == QUESTION for r in requests for m in r["messages"])
        [billing] = [r for r in requests if BILLING_INSTRUCTIONS in r["instructions"]]
        contents = [m.get("content") for m in billing["messages"]]
        assert QUESTION in contents and BILLING_QUESTION in contents, contents
        assert BILLING_OPENING in said, said

        def llm_tokens() -> float:
            return sum(
                value
                for labels, value in sample_values(
                    worker.metrics(), "voicefleet_llm_prompt_tokens_total"
                )
            )

        await wait_until(
            "LLM tokens counted", lambda: llm_tokens() > 0, 20, describe=worker.log_tail
        )
        figures = {"dispatch_to_greeting_s": round(greeting_s, 2), "turn_s": turn_s}
        print("realtime measurements:", json.dumps(figures))
        for key, value in figures.items():
            record_property(key, value)
    finally:
        await worker.stop()


async def test_a_phone_call_to_a_realtime_agent(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """sipp through livekit-sip: the 8 kHz caller reaches the model (resampled to 24 kHz), its
    greeting and answer reach the caller as PCMU."""
    dispatch_name = f"realtime-phone-{uuid.uuid4().hex[:6]}"
    config = realtime_config(dispatch_name, providers, webhooks.url)
    providers.script_transcripts(QUESTION)
    providers.script_llm(LLMReply(GREETING), LLMReply(ANSWER, match="order"))
    worker = RuntimeWorker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        _, result = await call_a_fresh_number(
            livekit,
            sip,
            dispatch_name,
            "call.xml",
            tmp_path / "sipp",
            talk_seconds=14,
            speech=QUESTION,
            speech_delay=5.0,  # after the greeting
        )
        assert result.returncode == 0, result.describe()
        assert result.answered_at is not None, result.describe()
        requests = providers.requests("realtime")
        answered = [r for r in requests if r["reply"]["text"] == ANSWER]
        assert answered, [r["reply"] for r in requests]
        assert any(m.get("content") == QUESTION for m in answered[0]["messages"])
        # The caller heard the greeting and the answer: voiced PCMU from livekit-sip.
        voiced = result.capture.voiced_seconds()
        assert voiced > 2.0, result.describe()
        first_audio = result.invite_to_first_audio
        print(
            "realtime phone:",
            json.dumps({"voiced_s": voiced, "invite_to_first_audio_s": first_audio}),
        )
        record_property("invite_to_first_audio_s", first_audio or -1)
    finally:
        await worker.stop()
