"""Call records against a real livekit-server: a worker process (`python -m voicefleet_runtime
start`), a WebRTC caller (livekit rtc SDK), the local provider servers and a real HTTP receiver
standing in for the tenant's webhook.

- one call -> exactly one record, signed, with the greeting and the caller's words, the tool call
  without its secret header, non-zero usage and the right end reason;
- the receiver down for 60 s from before the call until after it -> the record arrives once the
  receiver is back;
- the worker SIGTERMed as the caller hangs up, the receiver failing the first attempt -> the
  record is still delivered before the worker exits;
- a caller beyond capacity, who gets the overflow treatment, leaves a record too;
- a phone call through livekit-sip (sipp) -> a record with the caller's and dialled numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_runtime.admission import DEFAULT_OVERFLOW_MESSAGE
from voicefleet_runtime.callrecords import CallRecord, verify
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall, pointed_at
from voicefleet_testkit.records import RecordReceiver as Receiver
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import (
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

SIGNING_KEY = "whsec-" + uuid.uuid4().hex
QUESTION = "Where is my order A-1234?"
ANSWER = "Your order A-1234 has shipped."
EXAMPLE_PIPELINE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml").read_text()
)["spec"]["pipeline"]
RECEIVER_DOWN_SECONDS = 60.0
# Backoff tops out at 60 s (+20 % jitter): the first attempt after the receiver is back.
DELIVERY_AFTER_RECOVERY_TIMEOUT_S = 100.0


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().up()
    yield server
    await server.down()


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


def records_config(
    dispatch_name: str, provider_url: str, webhook_url: str, receiver: Receiver, **worker: Any
) -> dict[str, Any]:
    config = runtime_config(dispatch_name, provider_url, webhook_url, **worker)
    config["callRecords"] = {
        "webhook": {
            "url": receiver.url,
            "timeoutSeconds": 5,
            "signingKeyFromEnv": "RECORDS_SIGNING_KEY",
        }
    }
    return config


def records_worker(
    livekit: LiveKitEndpoint, config: dict[str, Any], workdir: Path
) -> RuntimeWorker:
    worker = RuntimeWorker(livekit, config, workdir)
    worker.env["RECORDS_SIGNING_KEY"] = SIGNING_KEY
    worker.env["VOICEFLEET_SPOOL_DIR"] = str(workdir / "spool")
    return worker


def counted(worker: RuntimeWorker, result: str) -> float:
    return sum(
        value
        for labels, value in sample_values(worker.metrics(), "voicefleet_call_records_total")
        if labels.get("result") == result
    )


def check_signed(delivery: dict[str, Any]) -> CallRecord:
    """What a receiver does: verify the signature over the raw body, then parse."""
    headers = delivery["headers"]
    assert verify(delivery["body"], SIGNING_KEY.encode(), headers["X-VoiceFleet-Signature"])
    assert not verify(delivery["body"], b"another key", headers["X-VoiceFleet-Signature"])
    record = CallRecord.model_validate_json(delivery["body"])
    assert headers["X-VoiceFleet-Delivery"] == record.record_id
    assert headers["Content-Type"] == "application/json"
    return record


def report(record_property: Callable[[str, object], None], **figures: object) -> None:
    print("call record measurements:", json.dumps(figures))
    for key, value in figures.items():
        record_property(key, value)


async def test_one_call_leaves_one_signed_record(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"records-{uuid.uuid4().hex[:6]}"
    config = records_config(dispatch_name, providers.base_url, webhooks.url, receiver)
    # The example's own pipeline (Deepgram STT, OpenAI LLM, ElevenLabs TTS, Silero VAD, its
    # turn detection) on the local protocol servers, as the demo points it.
    config["pipeline"] = pointed_at(EXAMPLE_PIPELINE, providers.url)
    providers.script_transcripts(QUESTION)
    providers.script_llm(
        LLMReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-1234"})], match="order"),
        LLMReply(ANSWER, after="tool"),
    )
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.env.update(DEEPGRAM_API_KEY="dg-test-records", ELEVEN_API_KEY="el-test-records")
    worker.start()
    try:
        await worker.wait_registered()
        async with dispatched_call(livekit, dispatch_name) as call:
            await call.wait_for_greeting()
            await call.ask(QUESTION)
            assert webhooks.calls[-1]["headers"]["Authorization"] == ORDERS_TOKEN
            room = call.room
        hung_up_at = time.time()  # the caller left the room

        await wait_until(
            "the call's record at the receiver",
            lambda: bool(receiver.records_for(room)),
            30,
            describe=worker.log_tail,
        )
        [delivery] = receiver.records_for(room).values()
        record = check_signed(delivery)
        raw = delivery["body"].decode()
        wire = delivery["record"]

        assert (record.tenant, record.voice_agent, record.dispatch_name) == (
            "acme",
            "support",
            dispatch_name,
        )
        assert record.room == room and record.channel == "webrtc"
        assert record.end_reason == "caller_hung_up", record.end_detail
        assert record.answered_at is not None and record.started_at <= record.answered_at
        assert record.answered_at <= record.ended_at
        assert len(record.config_hash) == 16
        said = [(turn.speaker, turn.text) for turn in record.transcript]
        assert ("agent", GREETING) in said, said
        assert ("caller", QUESTION) in said, said
        assert ("agent", ANSWER) in said, said
        # The caller's words were recognised by the Deepgram server (streaming, the example's
        # model), and the agent's words synthesised by the ElevenLabs server.
        heard = [r for r in providers.requests("stt") if not r.get("silent")]
        assert {(r["provider"], r["model"]) for r in heard} == {("deepgram", "nova-3")}, heard
        assert QUESTION in [r["transcript"] for r in heard], heard
        synthesised = [
            (r["provider"], r["model"], r["text"])
            for r in providers.requests("tts")
            if r["text"] != DEFAULT_OVERFLOW_MESSAGE
        ]
        assert {p[:2] for p in synthesised} == {("elevenlabs", "eleven_flash_v2_5")}, synthesised
        assert ANSWER in " ".join(p[2] for p in synthesised), synthesised
        assert GREETING in " ".join(p[2] for p in synthesised), synthesised
        assert {u.provider for u in record.usage.stt} == {"deepgram"}, record.usage.stt
        assert {u.provider for u in record.usage.tts} == {"elevenlabs"}, record.usage.tts
        assert [a.name for a in record.agents] == ["receptionist"]
        [tool] = [t for t in record.tool_calls if t.name == "lookup_order"]
        assert tool.arguments == {"order_id": "A-1234"} and tool.status == "ok"
        assert tool.agent == "receptionist" and tool.latency_seconds is not None
        # The tool's secret header went to the webhook, never into the record.
        assert ORDERS_TOKEN not in raw and "Authorization" not in raw
        [llm] = record.usage.llm
        assert llm.provider == "openai" and llm.prompt_tokens > 0 and llm.completion_tokens > 0
        assert sum(t.characters for t in record.usage.tts) > 0
        assert sum(s.audio_seconds for s in record.usage.stt) > 0
        assert record.latency.dispatch_to_greeting_seconds is not None
        assert record.latency.turns >= 1 and record.latency.turn_p50_seconds is not None

        # Exactly one record for the call: nothing more arrives while the spool drains empty
        # and the worker exits (a flush at exit would deliver any second record).
        await worker.stop()
        assert "call record spool empty at exit" in worker.log(), worker.log_tail()
        assert len(receiver.records_for(room)) == 1
        assert [d["status"] for d in receiver.deliveries] == [200]
        delay = delivery["at"] - hung_up_at
        (tmp_path / "record.json").write_text(json.dumps(wire, indent=2))
        report(
            record_property,
            call_end_to_record_delivered_s=round(delay, 3),
            record_ended_at_to_delivered_s=round(delivery["at"] - record.ended_at.timestamp(), 3),
            record_bytes=len(delivery["body"]),
        )
        print("sample call record:", json.dumps(wire, indent=2))
    finally:
        await worker.stop()


async def test_record_arrives_after_the_receiver_comes_back(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"records-down-{uuid.uuid4().hex[:6]}"
    config = records_config(dispatch_name, providers.base_url, webhooks.url, receiver)
    providers.script_transcripts("What are your opening hours?")
    providers.script_llm(LLMReply("We are open from nine to five.", match="opening hours"))
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        await receiver.down()
        down_at = time.monotonic()
        async with dispatched_call(livekit, dispatch_name) as call:
            await call.wait_for_greeting()
            await call.ask("What are your opening hours?")
            room = call.room

        # The worker tried and failed: the record waits in the spool, retried with backoff.
        await wait_until(
            "a failed delivery attempt counted as retried",
            lambda: counted(worker, "retried") >= 1,
            30,
            describe=worker.log_tail,
        )
        assert "not delivered to" in worker.log()
        assert len(list((tmp_path / "worker" / "spool" / "pending").glob("*.json"))) == 1
        await asyncio.sleep(max(0.0, RECEIVER_DOWN_SECONDS - (time.monotonic() - down_at)))
        retried_while_down = counted(worker, "retried")

        await receiver.up()
        back_at = time.monotonic()
        await wait_until(
            "the record delivered once the receiver is back",
            lambda: bool(receiver.records_for(room)),
            DELIVERY_AFTER_RECOVERY_TIMEOUT_S,
            describe=worker.log_tail,
        )
        arrived_after = time.monotonic() - back_at
        [delivery] = receiver.records_for(room).values()
        record = check_signed(delivery)
        assert record.end_reason == "caller_hung_up"
        assert ("caller", "What are your opening hours?") in [
            (t.speaker, t.text) for t in record.transcript
        ]
        await wait_until("delivered counted", lambda: counted(worker, "delivered") == 1, 10)
        assert counted(worker, "failed") == 0
        assert list((tmp_path / "worker" / "spool" / "pending").glob("*.json")) == []
        report(
            record_property,
            receiver_down_s=round(back_at - down_at, 1),
            attempts_while_down=retried_while_down,
            delivered_after_receiver_back_s=round(arrived_after, 3),
        )
    finally:
        await worker.stop()


async def test_record_of_the_last_call_is_delivered_when_the_worker_is_sigtermed(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"records-term-{uuid.uuid4().hex[:6]}"
    config = records_config(dispatch_name, providers.base_url, webhooks.url, receiver)
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        # The first attempt fails: the record must be retried during the shutdown.
        receiver.script = [503]
        async with dispatched_call(livekit, dispatch_name) as call:
            await call.wait_for_greeting()
            room = call.room
        assert worker.process is not None
        sigterm_at = time.monotonic()
        worker.process.send_signal(15)  # SIGTERM, as the kubelet sends it, as the call ends

        exit_code = await asyncio.to_thread(worker.process.wait, 90)
        exited_after = time.monotonic() - sigterm_at
        assert exit_code == 0, worker.log_tail()
        statuses = [d["status"] for d in receiver.deliveries]
        assert statuses == [503, 200], (statuses, worker.log_tail())
        [delivery] = receiver.records_for(room).values()
        record = check_signed(delivery)
        assert record.end_reason == "caller_hung_up", record.end_detail
        assert ("agent", GREETING) in [(t.speaker, t.text) for t in record.transcript]
        assert list((tmp_path / "worker" / "spool" / "pending").glob("*.json")) == []
        assert "call record spool empty at exit" in worker.log(), worker.log_tail()
        report(record_property, sigterm_to_exit_s=round(exited_after, 3))
    finally:
        await worker.stop()


async def test_a_caller_beyond_capacity_leaves_an_overflow_record(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    dispatch_name = f"records-overflow-{uuid.uuid4().hex[:6]}"
    config = records_config(
        dispatch_name,
        providers.base_url,
        webhooks.url,
        receiver,
        jobsPerWorker=1,
        loadThreshold=1.0,
        idleProcesses=2,
    )
    config["overflow"] = {"message": "All of our agents are busy. Please call again later."}
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        async with dispatched_call(livekit, dispatch_name) as first:
            await first.wait_for_greeting()
            async with dispatched_call(livekit, dispatch_name) as second:
                agent = await second.caller.wait_for_participant(agent=True, timeout_s=60)
                assert agent.attributes.get("voicefleet.overflow") == "capacity"
                await wait_until(
                    "the overflow call's record",
                    lambda: bool(receiver.records_for(second.room)),
                    60,
                    describe=worker.log_tail,
                )
            [overflowed] = receiver.records_for(second.room).values()
            record = check_signed(overflowed)
            assert record.end_reason == "overflow", record.end_detail
            assert "capacity" in record.end_detail
            assert record.channel == "webrtc" and record.transcript == []
            first_room = first.room
        await wait_until(
            "the answered call's record",
            lambda: bool(receiver.records_for(first_room)),
            30,
            describe=worker.log_tail,
        )
        [answered] = receiver.records_for(first_room).values()
        assert check_signed(answered).end_reason == "caller_hung_up"
    finally:
        await worker.stop()


async def test_a_phone_call_leaves_a_record_with_the_numbers(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    receiver: Receiver,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """sipp dials a number whose trunk and dispatch rule lead to the worker: the record says it
    was a phone call, from whom to which number, with both sides of the conversation."""
    dispatch_name = f"records-phone-{uuid.uuid4().hex[:6]}"
    config = records_config(dispatch_name, providers.base_url, webhooks.url, receiver)
    caller_words = "Where is my order?"
    providers.script_transcripts(caller_words)
    providers.script_llm(LLMReply("Let me check that for you.", match="order"))
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        number, result = await call_a_fresh_number(
            livekit,
            sip,
            dispatch_name,
            "call.xml",
            tmp_path / "sipp",
            caller="+15550001111",
            talk_seconds=14,
            speech="Where is my order?",
            speech_delay=5.0,  # after the greeting
        )
        assert result.returncode == 0, result.describe()
        assert result.bye_sent_at is not None, result.describe()
        # The caller's BYE, on the wall clock the receiver stamps deliveries with.
        hung_up_at = time.time() - (time.monotonic() - result.bye_sent_at)

        def phone_records() -> list[dict[str, Any]]:
            return [d for d in receiver.accepted() if d["record"].get("dialedNumber") == number]

        await wait_until(
            "the phone call's record", lambda: bool(phone_records()), 30, describe=worker.log_tail
        )
        [delivery] = phone_records()
        record = check_signed(delivery)
        assert record.channel == "phone"
        assert (record.caller_number, record.dialed_number) == ("+15550001111", number)
        assert record.sip_call_id
        assert record.end_reason == "caller_hung_up", record.end_detail
        said = [(turn.speaker, turn.text) for turn in record.transcript]
        assert ("agent", GREETING) in said, said
        assert ("caller", caller_words) in said, said
        assert record.usage.stt and record.usage.stt[0].audio_seconds > 0
        report(record_property, phone_call_end_to_record_s=round(delivery["at"] - hung_up_at, 3))
    finally:
        await worker.stop()
