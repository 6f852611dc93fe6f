"""Call records: the record built from session events, its signature, the spool and delivery
against a real local HTTP receiver (aiohttp), including retries, 4xx and the retry bound."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from livekit.agents import (
    AgentSession,
    AgentStateChangedEvent,
    CloseEvent,
    ConversationItemAddedEvent,
    FunctionToolsExecutedEvent,
    SessionUsageUpdatedEvent,
)
from livekit.agents.llm import AgentHandoff, ChatMessage, FunctionCall, FunctionCallOutput
from livekit.agents.metrics import AgentSessionUsage, LLMModelUsage, STTModelUsage, TTSModelUsage
from livekit.agents.voice.events import CloseReason
from prometheus_client import REGISTRY
from voicefleet_runtime import callrecords
from voicefleet_runtime.callrecords import CallRecord, serialize, sign, verify
from voicefleet_runtime.config import CallRecordWebhook, parse_config
from voicefleet_runtime.delivery import RecordDelivery, Spool, backoff_seconds, signing_key
from voicefleet_runtime.recorder import CallRecorder, end_reason

SECRET_HEADER_VALUE = "Bearer s3cret-" + uuid.uuid4().hex
KEY = b"whsec-test-key"


# --- the record -------------------------------------------------------------------------------


def recorder_with_a_call(started: float) -> tuple[CallRecorder, AgentSession[None]]:
    """A recorder fed the events of a short call: greeting, question, tool call, handoff,
    reply, the caller hanging up."""
    recorder = CallRecorder(
        tenant="acme",
        voice_agent="support",
        dispatch_name="acme.support",
        config_hash="0123456789abcdef",
        job_id="AJ_test",
        room="room-1",
        providers={"llm_usage": "openai", "tts_usage": "openai", "stt_usage": "deepgram"},
        dispatch_received_at=started,
        clock=lambda: started + 30,
    )
    recorder.set_caller(
        phone=True, caller_number="+15550001111", dialed_number="+15557654321", sip_call_id="SCL_1"
    )
    session: AgentSession[None] = AgentSession()
    current = ["receptionist"]
    recorder.attach(session, current_agent=lambda: current[0])

    def item(value: Any) -> None:
        session.emit("conversation_item_added", ConversationItemAddedEvent(item=value))

    item(AgentHandoff(new_agent_id="receptionist", created_at=started + 0.5))
    session.emit(
        "agent_state_changed",
        AgentStateChangedEvent(old_state="listening", new_state="speaking", created_at=started + 1),
    )
    greeting = ChatMessage(role="assistant", content=["Hello, Acme here."], created_at=started + 1)
    greeting.metrics = {"started_speaking_at": started + 1, "stopped_speaking_at": started + 3}
    item(greeting)
    question = ChatMessage(role="user", content=["Where is order A-1?"], created_at=started + 6)
    question.metrics = {"started_speaking_at": started + 4, "stopped_speaking_at": started + 5.5}
    item(question)
    call = FunctionCall(
        call_id="c1",
        name="lookup_order",
        arguments=json.dumps({"order_id": "A-1"}),
        created_at=started + 6.5,
    )
    output = FunctionCallOutput(
        call_id="c1", name="lookup_order", output="shipped", is_error=False, created_at=started + 7
    )
    failing = FunctionCall(call_id="c2", name="broken", arguments="{}", created_at=started + 7)
    failed = FunctionCallOutput(
        call_id="c2",
        name="broken",
        output="The broken service failed (HTTP 500).",
        is_error=True,
        created_at=started + 7.25,
    )
    session.emit(
        "function_tools_executed",
        FunctionToolsExecutedEvent(
            function_calls=[call, failing], function_call_outputs=[output, failed]
        ),
    )
    current[0] = "billing"
    item(AgentHandoff(old_agent_id="receptionist", new_agent_id="billing", created_at=started + 8))
    for latency in (0.9, 0.6, 1.4):
        reply = ChatMessage(role="assistant", content=["It has shipped."], interrupted=True)
        reply.metrics = {"e2e_latency": latency, "started_speaking_at": started + 9}
        item(reply)
    item(ChatMessage(role="system", content=["never in the transcript"]))
    session.emit(
        "session_usage_updated",
        SessionUsageUpdatedEvent(
            usage=AgentSessionUsage(
                model_usage=[
                    LLMModelUsage(
                        provider="127.0.0.1:8300",
                        model="gpt-4o-mini",
                        input_tokens=300,
                        input_cached_tokens=100,
                        output_tokens=20,
                    ),
                    TTSModelUsage(
                        provider="x", model="tts-1", characters_count=42, audio_duration=3
                    ),
                    STTModelUsage(provider="x", model="nova-3", audio_duration=1.5),
                ]
            )
        ),
    )
    session.emit("close", CloseEvent(reason=CloseReason.PARTICIPANT_DISCONNECTED))
    return recorder, session


def test_record_from_session_events() -> None:
    started = 1_790_000_000.0
    recorder, _ = recorder_with_a_call(started)
    record = recorder.finish("session closed: participant_disconnected")
    wire = json.loads(serialize(record))

    assert wire["schemaVersion"] == 1
    assert uuid.UUID(wire["recordId"])
    assert wire["tenant"] == "acme" and wire["voiceAgent"] == "support"
    assert wire["dispatchName"] == "acme.support" and wire["configHash"] == "0123456789abcdef"
    assert wire["channel"] == "phone" and wire["direction"] == "inbound"
    assert wire["callerNumber"] == "+15550001111" and wire["dialedNumber"] == "+15557654321"
    assert wire["startedAt"] == "2026-09-21T14:13:20Z"
    assert wire["answeredAt"] == "2026-09-21T14:13:21Z"
    assert wire["endedAt"] == "2026-09-21T14:13:50Z"
    assert wire["durationSeconds"] == 30
    assert wire["endReason"] == "caller_hung_up"
    assert "participant_disconnected" in wire["endDetail"]
    assert [(a["name"], a["startedAt"], a["endedAt"]) for a in wire["agents"]] == [
        ("receptionist", "2026-09-21T14:13:20.500000Z", "2026-09-21T14:13:28Z"),
        ("billing", "2026-09-21T14:13:28Z", "2026-09-21T14:13:50Z"),
    ]
    turns = wire["transcript"]
    assert [(t["speaker"], t["agent"], t["text"]) for t in turns[:2]] == [
        ("agent", "receptionist", "Hello, Acme here."),
        ("caller", "receptionist", "Where is order A-1?"),
    ]
    assert turns[1]["startedAt"] == "2026-09-21T14:13:24Z"
    assert turns[1]["endedAt"] == "2026-09-21T14:13:25.500000Z"
    assert turns[0]["interrupted"] is False and turns[-1]["interrupted"] is True
    assert turns[-1]["agent"] == "billing" and len(turns) == 5
    assert wire["toolCalls"] == [
        {
            "name": "lookup_order",
            "agent": "receptionist",
            "arguments": {"order_id": "A-1"},
            "status": "ok",
            "startedAt": "2026-09-21T14:13:26.500000Z",
            "latencySeconds": 0.5,
        },
        {
            "name": "broken",
            "agent": "receptionist",
            "arguments": {},
            "status": "error",
            "error": "The broken service failed (HTTP 500).",
            "startedAt": "2026-09-21T14:13:27Z",
            "latencySeconds": 0.25,
        },
    ]
    assert wire["usage"] == {
        "llm": [
            {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "promptTokens": 300,
                "cachedPromptTokens": 100,
                "completionTokens": 20,
            }
        ],
        "tts": [{"provider": "openai", "model": "tts-1", "characters": 42, "audioSeconds": 3.0}],
        "stt": [{"provider": "deepgram", "model": "nova-3", "audioSeconds": 1.5}],
    }
    assert wire["latency"] == {
        "dispatchToGreetingSeconds": 1.0,
        "turnP50Seconds": 0.9,
        "turnP95Seconds": 1.4,
        "turns": 3,
    }
    assert "recording" not in wire
    # A receiver parses it back with the same model.
    assert CallRecord.model_validate(wire) == record


def test_record_of_a_call_that_failed_before_anyone_spoke() -> None:
    recorder = CallRecorder(
        tenant="acme",
        voice_agent="support",
        dispatch_name="acme.support",
        config_hash="",
        job_id="AJ_x",
        room="r",
    )
    recorder.job_failed()
    wire = json.loads(serialize(recorder.finish("job crashed")))
    assert wire["endReason"] == "error"
    assert wire["channel"] == "webrtc" and "callerNumber" not in wire
    assert wire["transcript"] == [] and wire["agents"] == [] and "answeredAt" not in wire
    assert wire["latency"] == {"turns": 0}


@pytest.mark.parametrize(
    ("close", "shutdown", "flags", "expected"),
    [
        (
            "participant_disconnected",
            "session closed: participant_disconnected",
            {},
            "caller_hung_up",
        ),
        ("participant_disconnected", "", {"hung_up_by_agent": True}, "agent_ended"),
        ("participant_disconnected", "", {"transferred": True}, "transferred"),
        ("error", "session closed: error", {}, "error"),
        (None, "job crashed", {}, "error"),
        ("job_shutdown", "parent process shutdown", {}, "drained"),
        (None, "room disconnected", {}, "room_closed"),
        (None, "overflow: message (capacity)", {"overflowed": True}, "overflow"),
        (
            "participant_disconnected",
            "",
            {"overflowed": True, "hung_up_by_agent": True},
            "overflow",
        ),
    ],
)
def test_end_reason(close: str | None, shutdown: str, flags: dict[str, Any], expected: str) -> None:
    assert end_reason(close, shutdown, **flags) == expected
    assert expected in callrecords.END_REASONS


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"recordId":"r1"}'
    signature = sign(body, KEY)
    # What a receiver in any language computes: hex HMAC-SHA256 of the exact bytes received.
    import hashlib
    import hmac

    assert signature == "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
    assert verify(body, KEY, signature)
    assert not verify(body + b" ", KEY, signature)
    assert not verify(body, b"another key", signature)


def test_signing_key_comes_from_the_named_environment_variable() -> None:
    config = parse_config(
        {
            "tenant": "acme",
            "name": "support",
            "dispatchName": "acme.support",
            "agents": [{"name": "a", "instructions": "x"}],
            "entry": "a",
            "callRecords": {
                "webhook": {"url": "https://crm.example/calls", "signingKeyFromEnv": "RECORDS_KEY"}
            },
        }
    )
    webhook = config.records_webhook
    assert (
        webhook is not None and webhook.timeout_seconds == 10 and webhook.retry_for_seconds == 3600
    )
    assert "RECORDS_KEY" in config.secret_env_vars()
    assert signing_key(webhook, {"RECORDS_KEY": "k3y"}) == b"k3y"


@pytest.mark.parametrize("url", ["ftp://crm.example/x", "crm.example/calls", "http:///nohost"])
def test_webhook_url_must_be_http_or_https(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        CallRecordWebhook(url=url, signing_key_from_env="K")


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_seconds(n, 1, 60) for n in (1, 2, 3, 6, 7, 20)] == [1, 2, 4, 32, 60, 60]


# --- spool and delivery ---------------------------------------------------------------------


def a_record(**changes: Any) -> CallRecord:
    recorder, _ = recorder_with_a_call(time.time() - 30)
    record = recorder.finish("session closed: participant_disconnected")
    return record.model_copy(update=changes)


def test_spool_writes_whole_records_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.put(a_record(record_id="r-1"))
    second = spool.put(a_record(record_id="r-2"))
    # mtime resolution can tie; the name breaks ties, so order by what the spool reports.
    assert {p.name for p in spool.pending()} == {"r-1.json", "r-2.json"}
    assert [p.name for p in (spool.pending_dir).iterdir() if p.name.startswith(".")] == []
    assert json.loads(first.read_bytes())["recordId"] == "r-1"
    spool.done(second)
    assert [p.name for p in spool.pending()] == ["r-1.json"]


class Receiver:
    """The tenant's receiver: answers from a script of statuses (then 200), records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[int | str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append({"headers": dict(request.headers), "body": body})
        answer = self.script.pop(0) if self.script else 200
        if answer == "slow":
            await asyncio.sleep(2)
            answer = 200
        return web.Response(status=int(answer), text=f"answer {answer}")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/records", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/records"


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


def delivery_to(receiver: Receiver, spool: Spool, tenant: str, **webhook: Any) -> RecordDelivery:
    hook = CallRecordWebhook(url=receiver.url, signing_key_from_env="K", **webhook)
    return RecordDelivery(
        hook,
        KEY,
        spool.ensure(),
        {"tenant": tenant, "agent": "support"},
        backoff_initial=0.05,
        backoff_max=0.2,
        poll_seconds=0.02,
    )


def counted(tenant: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "voicefleet_call_records_total", {"tenant": tenant, "agent": "support", "result": result}
    )
    return value or 0.0


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def test_delivered_once_signed_with_its_record_id(receiver: Receiver, tmp_path: Path) -> None:
    name = tenant()
    spool = Spool(tmp_path)
    record = a_record()
    spool.put(record)
    delivery = delivery_to(receiver, spool, name)
    assert await delivery.deliver_due() == 0
    await delivery.aclose()

    [request] = receiver.requests
    body = request["body"]
    assert body == serialize(record)
    assert verify(body, KEY, request["headers"]["X-VoiceFleet-Signature"])
    assert request["headers"]["X-VoiceFleet-Delivery"] == record.record_id
    assert request["headers"]["Content-Type"] == "application/json"
    assert spool.pending() == []
    assert counted(name, "delivered") == 1 and counted(name, "retried") == 0


async def test_5xx_and_timeouts_are_retried_with_the_same_record_id(
    receiver: Receiver, tmp_path: Path
) -> None:
    name = tenant()
    spool = Spool(tmp_path)
    record = a_record()
    spool.put(record)
    receiver.script = [503, "slow", 500]
    delivery = delivery_to(receiver, spool, name, timeout_seconds=0.5)
    assert await delivery.flush(30) == []
    await delivery.aclose()
    assert len(receiver.requests) == 4
    assert {r["headers"]["X-VoiceFleet-Delivery"] for r in receiver.requests} == {record.record_id}
    assert {r["body"] for r in receiver.requests} == {serialize(record)}
    assert counted(name, "retried") == 3 and counted(name, "delivered") == 1
    assert counted(name, "failed") == 0


async def test_4xx_is_logged_and_not_retried(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = tenant()
    spool = Spool(tmp_path)
    record = a_record()
    spool.put(record)
    receiver.script = [422]
    delivery = delivery_to(receiver, spool, name)
    assert await delivery.deliver_due() == 0
    for _ in range(3):
        await delivery.deliver_due()
    await delivery.aclose()
    assert len(receiver.requests) == 1
    assert counted(name, "failed") == 1 and counted(name, "retried") == 0
    assert (spool.failed_dir / f"{record.record_id}.json").exists()
    assert f"call record {record.record_id} FAILED" in caplog.text
    assert "HTTP 422" in caplog.text


async def test_retries_stop_after_retry_for_seconds(receiver: Receiver, tmp_path: Path) -> None:
    name = tenant()
    spool = Spool(tmp_path)
    spool.put(a_record())
    receiver.script = [503] * 100
    delivery = delivery_to(receiver, spool, name, retry_for_seconds=1)
    assert await delivery.flush(30) == []
    await delivery.aclose()
    assert counted(name, "failed") == 1
    assert counted(name, "retried") == len(receiver.requests) - 1 >= 1
    assert len(list(spool.failed_dir.iterdir())) == 1


async def test_unreachable_receiver_keeps_the_record_for_the_next_start(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A flush that runs out of time leaves the record in the spool; a new delivery loop (a
    restarted worker) on the same spool delivers it."""
    name = tenant()
    spool = Spool(tmp_path)
    record = a_record()
    spool.put(record)
    down = CallRecordWebhook(url="http://127.0.0.1:9/records", signing_key_from_env="K")
    first = RecordDelivery(down, KEY, spool, {"tenant": name, "agent": "support"})
    assert await first.flush(0.3) == [record.record_id]
    await first.aclose()
    assert counted(name, "retried") >= 1

    restarted = delivery_to(receiver, Spool(tmp_path), name)
    assert await restarted.flush(10) == []
    await restarted.aclose()
    assert [r["headers"]["X-VoiceFleet-Delivery"] for r in receiver.requests] == [record.record_id]


async def test_records_never_carry_tool_header_secrets(receiver: Receiver, tmp_path: Path) -> None:
    """A webhook tool called with a secret Authorization header: the record holds the call,
    its arguments and status, and not the header's value."""
    from voicefleet_runtime.config import WebhookTool
    from voicefleet_runtime.tools import ToolBox

    tool = WebhookTool.model_validate(
        {
            "name": "lookup_order",
            "description": "Look up an order.",
            "http": {
                "url": receiver.url,
                "headers": [{"name": "Authorization", "valueFromEnv": "ORDERS_TOKEN"}],
            },
        }
    )
    toolbox = ToolBox([tool], {"ORDERS_TOKEN": SECRET_HEADER_VALUE}, {"tenant": "t", "agent": "a"})
    started = time.time()
    result = await toolbox.callers["lookup_order"]({"order_id": "A-1"})
    await toolbox.aclose()
    assert receiver.requests[0]["headers"]["Authorization"] == SECRET_HEADER_VALUE

    recorder = CallRecorder(
        tenant="t", voice_agent="a", dispatch_name="t.a", config_hash="", job_id="j", room="r"
    )
    session: AgentSession[None] = AgentSession()
    recorder.attach(session, current_agent=lambda: "receptionist")
    call = FunctionCall(
        call_id="c", name="lookup_order", arguments='{"order_id": "A-1"}', created_at=started
    )
    output = FunctionCallOutput(call_id="c", name="lookup_order", output=result, is_error=False)
    session.emit(
        "function_tools_executed",
        FunctionToolsExecutedEvent(function_calls=[call], function_call_outputs=[output]),
    )
    path = Spool(tmp_path).put(recorder.finish("session closed: participant_disconnected"))
    text = path.read_text()
    assert json.loads(text)["toolCalls"][0]["arguments"] == {"order_id": "A-1"}
    assert SECRET_HEADER_VALUE not in text
    assert "s3cret" not in text


# --- recordings -------------------------------------------------------------------------------


def test_sigv4_matches_the_aws_documented_example() -> None:
    """AWS's own example (S3 API reference, "Signature Calculations for the Authorization
    Header", GET Object): the same canonical request, the same signature."""
    import datetime as dt

    from voicefleet_runtime.recording import EMPTY_SHA256, sign

    headers = sign(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        EMPTY_SHA256,
        region="us-east-1",
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        now=dt.datetime(2013, 5, 24, tzinfo=dt.UTC),
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-date"] == "20130524T000000Z"


def recording_config(**changes: Any) -> dict[str, Any]:
    storage = {
        "endpoint": "http://127.0.0.1:7070",
        "bucket": "acme-calls",
        "prefix": "calls/",
        "accessKeyIdFromEnv": "S3_ACCESS",
        "secretAccessKeyFromEnv": "S3_SECRET",
        **changes,
    }
    return {
        "tenant": "acme",
        "name": "support",
        "dispatchName": "acme.support",
        "agents": [{"name": "a", "instructions": "x"}],
        "entry": "a",
        "callRecords": {"recording": storage},
    }


def test_recording_config_needs_its_credentials_in_the_environment() -> None:
    from voicefleet_runtime.recording import object_key, object_url

    config = parse_config(recording_config())
    storage = config.recording
    assert storage is not None and storage.region == "us-east-1"
    assert {"S3_ACCESS", "S3_SECRET"} <= set(config.secret_env_vars())
    assert object_key(storage, "r-1") == "calls/r-1.ogg"
    assert (
        object_url(storage, "calls/r 1.ogg") == "http://127.0.0.1:7070/acme-calls/calls/r%201.ogg"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bucket": "Acme_Calls"}, "callRecords.recording.bucket"),
        ({"endpoint": "s3.example.com"}, "callRecords.recording.endpoint"),
        ({"endpoint": "https://s3.example.com/acme-calls"}, "callRecords.recording.endpoint"),
        ({"prefix": "/calls/"}, "callRecords.recording.prefix"),
    ],
)
def test_bad_recording_settings_are_refused(change: dict[str, Any], field: str) -> None:
    from voicefleet_runtime.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(recording_config(**change))


def test_record_carries_its_recording_and_ends_when_the_call_did() -> None:
    from voicefleet_runtime.callrecords import Recording, utc

    started = 1_790_000_000.0
    now = [started + 10]
    recorder = CallRecorder(
        tenant="t",
        voice_agent="a",
        dispatch_name="t.a",
        config_hash="",
        job_id="j",
        room="r",
        dispatch_received_at=started,
        clock=lambda: now[0],
    )
    recorder.mark_ended()
    now[0] += 5  # the upload took 5 s: endedAt stays the end of the call
    recorder.recording = Recording(
        bucket="acme-calls",
        object_key="calls/x.ogg",
        duration_seconds=9.5,
        content_type="audio/ogg",
        started_at=utc(started + 0.5),
    )
    wire = json.loads(serialize(recorder.finish("room disconnected")))
    assert wire["durationSeconds"] == 10
    assert wire["recording"] == {
        "bucket": "acme-calls",
        "objectKey": "calls/x.ogg",
        "durationSeconds": 9.5,
        "contentType": "audio/ogg",
        "channels": "stereo-caller-left-agent-right",
        "startedAt": "2026-09-21T14:13:20.500000Z",
    }
