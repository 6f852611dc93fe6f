"""The local provider servers, over real HTTP, with the real `openai` client and the real
livekit openai plugins (the code paths the runtime uses)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
from livekit import rtc
from livekit.agents import llm as lk_llm
from livekit.agents.stt import SpeechEventType
from livekit.plugins import deepgram as lk_deepgram
from livekit.plugins import elevenlabs as lk_elevenlabs
from livekit.plugins import openai as lk_openai
from openai.types.chat import ChatCompletionChunk
from voicefleet_testkit.net import free_port
from voicefleet_testkit.providers import (
    DEFAULT_GREETING_REPLY,
    LLMReply,
    ProviderControl,
    ProviderControlError,
    ProviderServer,
    ToolCall,
    Transcript,
)
from voicefleet_testkit.providers.audio import PcmAudio, decode_audio, synthesize

REPO = Path(__file__).resolve().parents[2]
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}


@pytest_asyncio.fixture
async def providers() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as server:
        yield server


def client(server: ProviderServer, api_key: str = "test-key") -> openai.AsyncClient:
    return openai.AsyncClient(base_url=server.base_url, api_key=api_key, max_retries=0)


async def stream_chat(
    server: ProviderServer, messages: list[Any], **kwargs: Any
) -> list[ChatCompletionChunk]:
    # Typed loosely: the test sends hand-written message dicts on purpose.
    completions: Any = client(server).chat.completions
    stream = await completions.create(
        model="gpt-4o-mini",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    return [chunk async for chunk in stream]


# --- chat completions ------------------------------------------------------------------------


async def test_streamed_text_reply_parses_with_the_openai_client(providers: ProviderServer) -> None:
    providers.script_llm("Our opening hours are nine to five.")
    chunks = await stream_chat(providers, [{"role": "user", "content": "When are you open?"}])

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Our opening hours are nine to five."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


async def test_streamed_tool_calls_accumulate_to_the_scripted_arguments(
    providers: ProviderServer,
) -> None:
    providers.script_llm(
        LLMReply(
            tool_calls=[
                ToolCall("lookup_order", {"order_id": "A-1234", "verbose": True}),
                ToolCall("lookup_order", {"order_id": "B-9"}),
            ]
        )
    )
    chunks = await stream_chat(
        providers, [{"role": "user", "content": "Where is my order?"}], tools=[LOOKUP_TOOL]
    )

    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                assert delta.function is not None
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert [c["name"] for c in calls.values()] == ["lookup_order", "lookup_order"]
    assert json.loads(calls[0]["arguments"]) == {"order_id": "A-1234", "verbose": True}
    assert json.loads(calls[1]["arguments"]) == {"order_id": "B-9"}
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    recorded = providers.requests("chat")
    assert recorded[0]["body"]["tools"][0]["function"]["name"] == "lookup_order"


async def test_livekit_openai_llm_plugin_gets_text_tool_calls_and_usage(
    providers: ProviderServer,
) -> None:
    @lk_llm.function_tool
    async def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        return "shipped"

    providers.script_llm(
        LLMReply(text="Let me check.", tool_calls=[ToolCall("lookup_order", {"order_id": "A1"})])
    )
    model = lk_openai.LLM(model="gpt-4o-mini", base_url=providers.base_url, api_key="test-key")
    chat = lk_llm.ChatContext()
    chat.add_message(role="user", content="Where is order A1?")
    text, calls, usage = "", [], None
    async with model.chat(chat_ctx=chat, tools=[lookup_order]) as stream:
        async for chunk in stream:
            if chunk.delta:
                text += chunk.delta.content or ""
                calls += chunk.delta.tool_calls
            usage = chunk.usage or usage
    await model.aclose()

    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("lookup_order", {"order_id": "A1"})
    ]
    assert usage is not None and usage.total_tokens > 0
    body = providers.requests("chat")[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["name"] == "lookup_order"


async def test_non_streamed_completion(providers: ProviderServer) -> None:
    providers.script_llm(
        "Hello there.", LLMReply(tool_calls=[ToolCall("lookup_order", {"order_id": "Z"})])
    )
    completions = client(providers).chat.completions
    first = await completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    second = await completions.create(model="m", messages=[{"role": "user", "content": "Z?"}])

    assert first.choices[0].message.content == "Hello there."
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.total_tokens > 0
    tool_calls = second.choices[0].message.tool_calls
    assert tool_calls is not None and second.choices[0].finish_reason == "tool_calls"
    assert json.loads(tool_calls[0].function.arguments) == {"order_id": "Z"}  # type: ignore[union-attr]


async def test_default_policy_echoes_the_user_reads_tool_results_and_greets(
    providers: ProviderServer,
) -> None:
    async def reply(messages: list[Any]) -> str:
        chunks = await stream_chat(providers, messages)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    system = {"role": "system", "content": "You are a receptionist."}
    assert await reply([system]) == DEFAULT_GREETING_REPLY
    assert await reply([system, {"role": "user", "content": "Is it raining?"}]) == (
        "You said: Is it raining?"
    )
    tool_turn = [
        system,
        {"role": "user", "content": "Where is A1?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "A1"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "order A1 shipped on Monday"},
    ]
    assert await reply(tool_turn) == "Here is what I found: order A1 shipped on Monday"
    assert [r["reply"]["scripted"] for r in providers.requests("chat")] == [False] * 3


async def test_scripted_replies_can_wait_for_a_matching_turn(providers: ProviderServer) -> None:
    providers.script_llm(
        LLMReply(text="The billing team can help.", match="invoice"),
        LLMReply(text="Thanks for waiting.", after="tool"),
    )
    user = {"role": "user", "content": "Hello"}
    chunks = await stream_chat(providers, [user])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "You said: Hello"
    )
    chunks = await stream_chat(providers, [{"role": "user", "content": "About my INVOICE"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "The billing team can help."
    )
    assert providers.state.pending()["llm"] == 1


async def test_the_same_conversation_gets_the_same_reply_and_rules_can_repeat(
    providers: ProviderServer,
) -> None:
    async def reply(text: str) -> str:
        chunks = await stream_chat(providers, [{"role": "user", "content": text}])
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    providers.script_llm("First answer.", "Second answer.")
    providers.script_llm(LLMReply("Nine to five.", match="hours", repeat=True))
    # A retry or a re-run preemptive generation sends the same conversation again.
    assert await reply("Hello") == "First answer."
    assert await reply("Hello") == "First answer."
    assert await reply("Hello again") == "Second answer."
    assert await reply("Your hours?") == "Nine to five."
    assert await reply("Your hours, please?") == "Nine to five."
    assert providers.state.pending()["llm"] == 1  # the standing rule stays


async def test_a_retry_after_a_scripted_failure_moves_on(providers: ProviderServer) -> None:
    providers.script_llm(LLMReply(error_status=500), "Recovered.")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError):
        await stream_chat(providers, messages)
    chunks = await stream_chat(providers, messages)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Recovered."


async def test_scripted_error_and_missing_key_answer_like_openai(
    providers: ProviderServer,
) -> None:
    providers.script_llm(LLMReply(error_status=503))
    with pytest.raises(openai.APIStatusError) as failed:
        await stream_chat(providers, [{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 503

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{providers.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        ) as response,
    ):
        assert response.status == 401
        assert "API key" in (await response.json())["error"]["message"]


async def test_required_api_key_is_enforced_and_only_its_fingerprint_recorded() -> None:
    async with ProviderServer(api_key="sk-right") as server:
        with pytest.raises(openai.AuthenticationError):
            await client(server, "sk-wrong").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        await client(server, "sk-right").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        recorded = server.requests("chat")
    assert len(recorded) == 1
    assert "sk-right" not in json.dumps(recorded)
    assert len(recorded[0]["api_key_sha256"]) == 12


# --- speech ----------------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["pcm", "wav", "mp3", "opus", "aac", "flac"])
async def test_speech_is_real_non_silent_audio_in_every_format(
    providers: ProviderServer, response_format: str
) -> None:
    text = "Thank you for calling. How can I help?"
    async with client(providers).audio.speech.with_streaming_response.create(
        input=text,
        model="tts-1",
        voice="alloy",
        response_format=response_format,  # type: ignore[arg-type]
    ) as response:
        data = await response.read()
        content_type = response.headers["content-type"]

    if response_format == "pcm":
        assert content_type == "audio/pcm"
        speech = PcmAudio(np.frombuffer(data, dtype="<i2").astype(np.int16), 24000)
    else:
        speech = decode_audio(data)
        assert speech.sample_rate in (24000, 48000)
    assert speech.duration > 1.0, f"{response_format}: only {speech.duration:.2f}s of audio"
    assert speech.rms > 0.02, f"{response_format}: audio is (nearly) silent, rms {speech.rms}"
    (recorded,) = providers.requests("tts")
    assert recorded["text"] == text and recorded["characters"] == len(text)
    assert recorded["response_format"] == response_format


@pytest.mark.parametrize(
    ("response_format", "model", "stream_format"),
    [
        ("mp3", "gpt-4o-mini-tts", "sse"),
        ("pcm", "tts-1", "audio"),
        ("opus", "gpt-4o-mini-tts", "sse"),
    ],
)
async def test_livekit_openai_tts_plugin_plays_the_speech(
    providers: ProviderServer, response_format: str, model: str, stream_format: str
) -> None:
    tts = lk_openai.TTS(
        base_url=providers.base_url,
        api_key="test-key",
        model=model,
        response_format=response_format,
    )
    frames = [event.frame async for event in tts.synthesize("Your order has shipped.")]
    await tts.aclose()

    speech = rtc.combine_audio_frames(frames)
    samples = np.frombuffer(speech.data, dtype=np.int16)
    assert speech.sample_rate == 24000 and speech.num_channels == 1
    assert speech.duration > 1.0
    assert PcmAudio(samples, 24000).rms > 0.02
    (recorded,) = providers.requests("tts")
    assert recorded["stream_format"] == stream_format
    assert recorded["text"] == "Your order has shipped."


async def test_speech_rejects_an_empty_input(providers: ProviderServer) -> None:
    with pytest.raises(openai.BadRequestError, match="input"):
        await client(providers).audio.speech.create(input=" ", model="tts-1", voice="alloy")


# --- transcription ---------------------------------------------------------------------------


async def test_transcription_answers_the_script_and_records_the_audio(
    providers: ProviderServer,
) -> None:
    providers.script_transcripts("What are your opening hours?", Transcript("Thanks", delay=0.0))
    speech = await synthesize("What are your opening hours?", sample_rate=16000)
    first = await client(providers).audio.transcriptions.create(
        file=("question.wav", speech.to_wav_bytes(), "audio/wav"), model="gpt-4o-mini-transcribe"
    )
    second = await client(providers).audio.transcriptions.create(
        file=("question.wav", speech.to_wav_bytes(), "audio/wav"),
        model="whisper-1",
        response_format="verbose_json",
        language="en",
    )
    third = await client(providers).audio.transcriptions.create(
        file=("question.wav", speech.to_wav_bytes(), "audio/wav"), model="whisper-1"
    )

    assert first.text == "What are your opening hours?"
    assert second.text == "Thanks" and second.language == "english"
    assert abs(second.duration - speech.duration) < 0.01
    assert third.text == providers.state.default_transcript
    recorded = providers.requests("stt")
    assert [r["scripted"] for r in recorded] == [True, True, False]
    assert abs(recorded[0]["audio_seconds"] - speech.duration) < 0.01
    assert recorded[0]["rms"] == pytest.approx(speech.rms, rel=0.01)
    assert recorded[0]["sample_rate"] == 16000 and not recorded[0]["silent"]


async def test_silence_transcribes_to_nothing_and_keeps_the_script(
    providers: ProviderServer,
) -> None:
    providers.script_transcripts("kept for later")
    silence = PcmAudio.silence(1.0, 16000)
    result = await client(providers).audio.transcriptions.create(
        file=("silence.wav", silence.to_wav_bytes(), "audio/wav"), model="whisper-1"
    )
    assert result.text == ""
    assert providers.requests("stt")[0]["silent"] is True
    assert providers.state.pending()["transcripts"] == 1


async def test_livekit_openai_stt_plugin_http_path(providers: ProviderServer) -> None:
    providers.script_transcripts("I would like to book a table.")
    stt = lk_openai.STT(base_url=providers.base_url, api_key="test-key")
    assert not stt.capabilities.streaming, "use_realtime must default to False (HTTP path)"
    speech = await synthesize("I would like to book a table.", sample_rate=48000)
    frame = rtc.AudioFrame(speech.to_bytes(), 48000, 1, len(speech.samples))
    event = await stt.recognize([frame])
    await stt.aclose()

    assert event.alternatives[0].text == "I would like to book a table."
    (recorded,) = providers.requests("stt")
    assert recorded["model"] == "gpt-4o-mini-transcribe" and recorded["language"] == "en"
    assert abs(recorded["audio_seconds"] - speech.duration) < 0.01


async def test_transcription_rejects_audio_it_cannot_decode(providers: ProviderServer) -> None:
    with pytest.raises(openai.BadRequestError, match="corrupted"):
        await client(providers).audio.transcriptions.create(
            file=("x.wav", b"not audio at all", "audio/wav"), model="whisper-1"
        )


# --- control API -----------------------------------------------------------------------------


async def test_control_api_scripts_reads_and_resets(providers: ProviderServer) -> None:
    control = ProviderControl(providers.url)
    pending = await control.script(
        llm=["First.", LLMReply(tool_calls=[ToolCall("lookup_order", {"order_id": "7"})])],
        transcripts=["hello"],
    )
    assert pending == {"llm": 2, "transcripts": 1}
    chunks = await stream_chat(providers, [{"role": "user", "content": "x"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "First."
    chats = await control.wait_for_requests("chat", 1, timeout_s=5)
    assert chats[0]["body"]["messages"] == [{"role": "user", "content": "x"}]
    assert await control.requests("tts") == []

    with pytest.raises(ProviderControlError, match="unknown field"):
        await control.script(llm=[{"txet": "typo"}])
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{providers.url}/_control/requests", params={"kind": "nope"}) as response,
    ):
        assert response.status == 400

    await control.reset()
    assert await control.requests() == []
    assert (await control.health())["pending"] == {"llm": 0, "transcripts": 0}


async def test_standalone_process_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voicefleet_testkit.providers",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    control = ProviderControl(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await control.health()
                break
            except ProviderControlError:
                if process.returncode is not None or time.monotonic() > deadline:
                    process.kill()
                    output, _ = await process.communicate()
                    pytest.fail(f"provider process did not come up:\n{output.decode()}")
                await asyncio.sleep(0.2)
        await control.script_llm("From another process.")
        reply = await openai.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k"
        ).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "From another process."
    finally:
        if process.returncode is None:
            process.terminate()
        output, _ = await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0, output.decode()
    assert "listening on 127.0.0.1" in output.decode()


# --- Deepgram (streaming STT) ----------------------------------------------------------------


async def _push_realtime(stream: Any, speech: PcmAudio) -> None:
    # 10 ms frames, a little faster than real time: the server only counts audio time.
    for offset in range(0, len(speech.samples), 480):
        chunk = speech.samples[offset : offset + 480]
        stream.push_frame(rtc.AudioFrame(chunk.tobytes(), 48000, 1, len(chunk)))
        if offset % 4800 == 0:
            await asyncio.sleep(0.005)
    stream.end_input()


async def test_livekit_deepgram_plugin_streams_one_transcript_per_utterance(
    providers: ProviderServer,
) -> None:
    providers.script_transcripts("What are your opening hours?", "Thanks.")
    question = await synthesize("What are your opening hours?", sample_rate=48000)
    thanks = await synthesize("Thanks.", sample_rate=48000)
    pause = PcmAudio.silence(1.0, 48000)
    call = PcmAudio.silence(0.5, 48000) + question + pause + thanks + pause

    async with aiohttp.ClientSession() as http:
        stt = lk_deepgram.STT(base_url=providers.deepgram_url, api_key="dg-key", http_session=http)
        stream = stt.stream()
        pushing = asyncio.create_task(_push_realtime(stream, call))
        events = [(event.type, event.alternatives) async for event in stream]
        await pushing
        await stt.aclose()

    kinds = [kind for kind, _ in events if kind != SpeechEventType.RECOGNITION_USAGE]
    finals = [alts[0].text for kind, alts in events if kind == SpeechEventType.FINAL_TRANSCRIPT]
    assert finals == ["What are your opening hours?", "Thanks."]
    assert kinds[0] == SpeechEventType.START_OF_SPEECH
    assert kinds.count(SpeechEventType.START_OF_SPEECH) == 2
    assert kinds.count(SpeechEventType.END_OF_SPEECH) == 2
    assert SpeechEventType.INTERIM_TRANSCRIPT in kinds
    recorded = providers.requests("stt")
    assert [r["provider"] for r in recorded] == ["deepgram", "deepgram"]
    # The voiced part of espeak-ng's phrase, give or take the endpointing windows.
    assert 0.5 * question.duration < recorded[0]["audio_seconds"] <= question.duration
    assert recorded[0]["sample_rate"] == 16000 and recorded[0]["rms"] > 0.02


async def test_deepgram_finalize_ends_the_utterance_at_once(providers: ProviderServer) -> None:
    providers.script_transcripts("Book a table for two.")
    speech = await synthesize("Book a table for two.", sample_rate=16000)
    url = f"{providers.deepgram_url}?encoding=linear16&sample_rate=16000&interim_results=false"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url.replace("http", "ws", 1), headers={"Authorization": "Token k"}) as ws,
    ):
        # No trailing silence: only Finalize can end this utterance.
        voiced = speech.samples[: int(len(speech.samples) * 0.8)]
        await ws.send_bytes(voiced.tobytes())
        await ws.send_str(json.dumps({"type": "Finalize"}))
        result = json.loads((await ws.receive()).data)
        await ws.send_str(json.dumps({"type": "CloseStream"}))
        metadata = json.loads((await ws.receive()).data)

    assert result["type"] == "Results" and result["is_final"] and result["from_finalize"]
    assert result["channel"]["alternatives"][0]["transcript"] == "Book a table for two."
    assert metadata["type"] == "Metadata"
    assert metadata["duration"] == pytest.approx(len(voiced) / 16000, abs=0.03)


async def test_deepgram_refuses_a_connection_without_a_key(providers: ProviderServer) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(providers.deepgram_url.replace("http", "ws", 1))
    assert refused.value.status == 401


# --- ElevenLabs (TTS) ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["mp3_22050_32", "pcm_24000", "opus_48000_32"])
async def test_livekit_elevenlabs_plugin_speaks_over_http_and_websocket(
    providers: ProviderServer, encoding: str
) -> None:
    rate = int(encoding.split("_")[1])
    async with aiohttp.ClientSession() as http:
        tts = lk_elevenlabs.TTS(
            base_url=providers.elevenlabs_base_url,
            api_key="xi-key",
            http_session=http,
            encoding=encoding,  # type: ignore[arg-type]
        )
        chunked = [e.frame async for e in tts.synthesize("Hello from the chunked endpoint.")]
        stream = tts.stream()
        stream.push_text("Hello there. This reply is streamed ")
        stream.push_text("in two parts.")
        stream.end_input()
        streamed = [e.frame async for e in stream]
        await tts.aclose()

    for frames in (chunked, streamed):
        speech = rtc.combine_audio_frames(frames)
        assert speech.sample_rate == rate and speech.duration > 1.0
        assert PcmAudio(np.frombuffer(speech.data, dtype=np.int16), rate).rms > 0.02
    recorded = providers.requests("tts")
    assert [(r["provider"], r["stream_format"]) for r in recorded] == [
        ("elevenlabs", "http"),
        ("elevenlabs", "websocket"),
    ]
    assert recorded[1]["text"] == "Hello there. This reply is streamed in two parts."
    assert recorded[1]["response_format"] == encoding


@pytest.mark.parametrize("encoding", ["mp3_22050_32", "opus_48000_32"])
async def test_elevenlabs_context_is_one_decodable_stream_across_flushes(
    providers: ProviderServer, encoding: str
) -> None:
    url = (
        f"{providers.elevenlabs_base_url}/text-to-speech/voice-1/multi-stream-input"
        f"?model_id=eleven_turbo_v2_5&output_format={encoding}&sync_alignment=true"
    ).replace("http", "ws", 1)
    received = bytearray()
    alignments: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers={"xi-api-key": "xi-key"}) as ws,
    ):
        await ws.send_json({"text": " ", "voice_settings": {}, "context_id": "c1"})
        await ws.send_json({"text": "First sentence here. ", "context_id": "c1", "flush": True})
        await ws.send_json({"text": "And a second one. ", "context_id": "c1", "flush": True})
        await ws.send_json({"context_id": "c1", "close_context": True})
        while True:
            message = json.loads((await ws.receive(timeout=20)).data)
            assert message["contextId"] == "c1"
            if message.get("audio"):
                received += base64.b64decode(message["audio"])
            if message.get("alignment"):
                alignments.append(message["alignment"])
            if message.get("isFinal"):
                break

    # Two sentences, but one stream: a second header mid-stream would fail to decode.
    speech = decode_audio(bytes(received))
    spoken = [r["audio_seconds"] for r in providers.requests("tts")]
    assert len(spoken) == 2
    assert speech.duration == pytest.approx(sum(spoken), abs=0.15)
    assert speech.rms > 0.02
    # Alignment times keep counting up across the context.
    assert alignments[1]["charStartTimesMs"][0] >= alignments[0]["charStartTimesMs"][-1]
