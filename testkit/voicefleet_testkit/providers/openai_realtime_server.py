"""An OpenAI Realtime API endpoint (`GET /v1/realtime`, WebSocket), scripted like the others.

Speaks the GA event protocol that livekit-agents' `openai.realtime.RealtimeModel` uses:

  client -> server  session.update, conversation.item.create / .delete / .truncate,
                    input_audio_buffer.append / .commit / .clear, response.create / .cancel
  server -> client  session.created, session.updated, conversation.item.added / .deleted /
                    .truncated, input_audio_buffer.speech_started / .speech_stopped /
                    .committed / .cleared, conversation.item.input_audio_transcription.completed,
                    response.created, response.output_item.added, response.content_part.added,
                    response.output_audio_transcript.delta, response.output_audio.delta,
                    response.output_audio.done, response.output_audio_transcript.done,
                    response.content_part.done, response.output_item.done, response.done (with
                    usage), error

What it answers comes from the shared ProviderState: the caller's speech is detected by energy
(server VAD, `silence_duration_ms` from the session's turn detection), transcribed as the next
scripted transcript, and the reply is the next scripted LLMReply that fits the conversation (the
same matching as chat completions: text becomes espeak-ng speech at 24 kHz PCM16 with its
transcript; tool calls become function_call items). Every response is recorded as a `realtime`
request: the session's instructions and tools, the conversation as chat messages, the reply.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import uuid
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

import voicefleet_testkit.providers.audio as audio  # the module, not the package (no cycle)
from voicefleet_testkit.providers.script import STATE_KEY, LLMReply, ProviderState

log = logging.getLogger("voicefleet.providers.realtime")

SAMPLE_RATE = 24000
FRAME_SAMPLES = 480  # 20 ms
SPEECH_RMS = 0.01
"""Above this RMS (full scale 1.0, -40 dBFS) a 20 ms frame is speech."""
SPEECH_START_FRAMES = 3
AUDIO_CHUNK_SECONDS = 0.1
DEFAULT_SILENCE_MS = 500


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _item_text(item: dict[str, Any]) -> str:
    parts = []
    for content in item.get("content") or []:
        if isinstance(content, dict):
            parts.append(str(content.get("text") or content.get("transcript") or ""))
    return " ".join(p for p in parts if p)


class RealtimeSession:
    """One WebSocket connection: the conversation, the input buffer, the response in flight."""

    def __init__(self, ws: web.WebSocketResponse, state: ProviderState, model: str) -> None:
        self.ws = ws
        self.state = state
        self.model = model
        self.session: dict[str, Any] = {
            "type": "realtime",
            "id": _id("sess"),
            "model": model,
            "instructions": "",
            "tools": [],
            "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
        }
        self.items: list[dict[str, Any]] = []
        self.buffer = bytearray()
        self.pending = np.zeros(0, dtype=np.int16)
        self.speech_item: str | None = None
        self.loud_frames = 0
        self.quiet_ms = 0
        self.audio_ms = 0
        self.response: asyncio.Task[None] | None = None
        self.response_id: str | None = None

    # --- plumbing ---------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", _id("event"))
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(event))

    def turn_detection(self) -> dict[str, Any] | None:
        audio_options = self.session.get("audio") or {}
        detection = (audio_options.get("input") or {}).get("turn_detection", {"type": "server_vad"})
        return detection if isinstance(detection, dict) else None

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session})
        async for message in self.ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                event = json.loads(message.data)
                await self.handle(event)
            except Exception as error:  # a bad event is the client's error, not a crash
                log.exception("realtime event failed")
                await self.send(
                    {
                        "type": "error",
                        "error": {"type": "invalid_request_error", "message": str(error)},
                    }
                )
        if self.response is not None:
            self.response.cancel()

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            session = event.get("session") or {}
            for key, value in session.items():
                if value is not None:
                    self.session[key] = value
            await self.send({"type": "session.updated", "session": self.session})
        elif kind == "conversation.item.create":
            await self.add_item(dict(event["item"]), event.get("previous_item_id"))
        elif kind == "conversation.item.delete":
            item_id = event["item_id"]
            self.items = [item for item in self.items if item.get("id") != item_id]
            await self.send({"type": "conversation.item.deleted", "item_id": item_id})
        elif kind == "conversation.item.truncate":
            await self.send(
                {
                    "type": "conversation.item.truncated",
                    "item_id": event.get("item_id"),
                    "content_index": event.get("content_index", 0),
                    "audio_end_ms": event.get("audio_end_ms", 0),
                }
            )
        elif kind == "input_audio_buffer.append":
            await self.append_audio(base64.b64decode(event["audio"]))
        elif kind == "input_audio_buffer.commit":
            await self.commit(self.speech_item or _id("item"))
        elif kind == "input_audio_buffer.clear":
            self.buffer.clear()
            await self.send({"type": "input_audio_buffer.cleared"})
        elif kind == "response.create":
            await self.cancel_response()
            params = event.get("response") or {}
            self.response = asyncio.create_task(self.respond(params))
        elif kind == "response.cancel":
            await self.cancel_response()

    async def add_item(self, item: dict[str, Any], previous: str | None = None) -> None:
        item.setdefault("id", _id("item"))
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        tail = self.items[-1]["id"] if self.items else None
        index = next((i + 1 for i, it in enumerate(self.items) if it["id"] == previous), None)
        if previous is None or index is None:
            self.items.append(item)
            previous = tail
        else:
            self.items.insert(index, item)
        await self.send(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": item}
        )
        await self.send(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": item}
        )

    # --- input audio and server VAD ---------------------------------------------------------

    async def append_audio(self, data: bytes) -> None:
        self.buffer.extend(data)
        detection = self.turn_detection()
        if detection is None:
            return
        samples = np.concatenate([self.pending, np.frombuffer(data, dtype=np.int16)])
        silence_ms = int(detection.get("silence_duration_ms") or DEFAULT_SILENCE_MS)
        frames = len(samples) // FRAME_SAMPLES
        for index in range(frames):
            frame = samples[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES]
            self.audio_ms += 20
            loud = audio.rms(frame) > SPEECH_RMS
            if self.speech_item is None:
                self.loud_frames = self.loud_frames + 1 if loud else 0
                if self.loud_frames >= SPEECH_START_FRAMES:
                    self.speech_item = _id("item")
                    self.quiet_ms = 0
                    await self.cancel_response()
                    await self.send(
                        {
                            "type": "input_audio_buffer.speech_started",
                            "audio_start_ms": self.audio_ms - 60,
                            "item_id": self.speech_item,
                        }
                    )
            else:
                self.quiet_ms = 0 if loud else self.quiet_ms + 20
                if self.quiet_ms >= silence_ms:
                    item_id, self.speech_item = self.speech_item, None
                    self.loud_frames = 0
                    await self.send(
                        {
                            "type": "input_audio_buffer.speech_stopped",
                            "audio_end_ms": self.audio_ms,
                            "item_id": item_id,
                        }
                    )
                    await self.commit(item_id)
                    if detection.get("create_response", True):
                        await self.cancel_response()
                        self.response = asyncio.create_task(self.respond({}))
        self.pending = samples[frames * FRAME_SAMPLES :]

    async def commit(self, item_id: str) -> None:
        seconds = len(self.buffer) / 2 / SAMPLE_RATE
        self.buffer.clear()
        previous = self.items[-1]["id"] if self.items else None
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": previous,
                "item_id": item_id,
            }
        )
        transcript, _ = self.state.next_transcript()
        item = {
            "id": item_id,
            "type": "message",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript.text}],
        }
        await self.add_item(item, previous)
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript.text,
                "usage": {"type": "duration", "seconds": round(seconds, 3)},
            }
        )

    # --- responses --------------------------------------------------------------------------

    def chat_messages(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The conversation as chat-completions messages, for the shared LLM script."""
        messages: list[dict[str, Any]] = []
        instructions = params.get("instructions") or self.session.get("instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
        for item in self.items:
            kind = item.get("type")
            if kind == "message":
                messages.append({"role": item.get("role", "user"), "content": _item_text(item)})
            elif kind == "function_call":
                messages.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": item.get("call_id"),
                                "type": "function",
                                "function": {
                                    "name": item.get("name"),
                                    "arguments": item.get("arguments", "{}"),
                                },
                            }
                        ],
                    }
                )
            elif kind == "function_call_output":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": item.get("call_id"),
                        "content": item.get("output", ""),
                    }
                )
        return messages

    async def cancel_response(self) -> None:
        task, self.response = self.response, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def respond(self, params: dict[str, Any]) -> None:
        response_id = _id("resp")
        messages = self.chat_messages(params)
        tools = params.get("tools") or self.session.get("tools") or []
        reply = self.state.next_llm_reply(messages, tools)
        self.state.record(
            "realtime",
            {
                "model": self.model,
                "instructions": self.session.get("instructions", ""),
                "tools": [t.get("name") for t in tools if isinstance(t, dict)],
                "messages": messages,
                "reply": reply.to_json(),
            },
        )
        response: dict[str, Any] = {
            "id": response_id,
            "object": "realtime.response",
            "status": "in_progress",
            "output": [],
            "metadata": params.get("metadata"),
        }
        await self.send({"type": "response.created", "response": dict(response)})
        output: list[dict[str, Any]] = []
        status = "completed"
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.text:
                output.append(await self.speak(response_id, len(output), reply))
            for call in reply.tool_calls:
                output.append(await self.function_call(response_id, len(output), call))
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            prompt = _tokens(json.dumps(messages) + json.dumps(tools))
            completion = _tokens(
                reply.text + "".join(json.dumps(c.arguments) for c in reply.tool_calls)
            )
            done = {
                **response,
                "status": status,
                "output": output,
                "usage": {
                    "total_tokens": prompt + completion,
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "input_token_details": {
                        "text_tokens": prompt,
                        "audio_tokens": 0,
                        "cached_tokens": 0,
                    },
                    "output_token_details": {"text_tokens": completion, "audio_tokens": 0},
                },
            }
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send({"type": "response.done", "response": done})

    async def speak(self, response_id: str, index: int, reply: LLMReply) -> dict[str, Any]:
        item_id = _id("item")
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        where = {"response_id": response_id, "item_id": item_id, "output_index": index}
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response_id,
                "output_index": index,
                "item": item,
            }
        )
        await self.add_item(dict(item))
        await self.send(
            {
                **where,
                "type": "response.content_part.added",
                "content_index": 0,
                "part": {"type": "audio", "transcript": ""},
            }
        )
        speech = await audio.synthesize(reply.text, sample_rate=SAMPLE_RATE)
        pcm = speech.to_bytes()
        chunk = int(SAMPLE_RATE * AUDIO_CHUNK_SECONDS) * 2
        words = reply.text.split(" ")
        chunks = max(1, math.ceil(len(pcm) / chunk))
        for n in range(chunks):
            # the transcript spread over the audio, as the model streams both
            share = words[n * len(words) // chunks : (n + 1) * len(words) // chunks]
            if share:
                text = (" " if n and n * len(words) // chunks else "") + " ".join(share)
                await self.send(
                    {
                        **where,
                        "type": "response.output_audio_transcript.delta",
                        "content_index": 0,
                        "delta": text,
                    }
                )
            data = pcm[n * chunk : (n + 1) * chunk]
            await self.send(
                {
                    **where,
                    "type": "response.output_audio.delta",
                    "content_index": 0,
                    "delta": base64.b64encode(data).decode(),
                }
            )
            await asyncio.sleep(0)
        await self.send({**where, "type": "response.output_audio.done", "content_index": 0})
        await self.send(
            {
                **where,
                "type": "response.output_audio_transcript.done",
                "content_index": 0,
                "transcript": reply.text,
            }
        )
        part = {"type": "audio", "transcript": reply.text}
        await self.send(
            {**where, "type": "response.content_part.done", "content_index": 0, "part": part}
        )
        item.update(
            status="completed", content=[{"type": "output_audio", "transcript": reply.text}]
        )
        for stored in self.items:
            if stored["id"] == item_id:
                stored.update(item)
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response_id,
                "output_index": index,
                "item": item,
            }
        )
        return item

    async def function_call(self, response_id: str, index: int, call: Any) -> dict[str, Any]:
        item = {
            "id": _id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.name,
            "arguments": json.dumps(call.arguments),
        }
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response_id,
                "output_index": index,
                "item": {**item, "status": "in_progress", "arguments": ""},
            }
        )
        await self.add_item(dict(item))
        await self.send(
            {
                "type": "response.function_call_arguments.done",
                "response_id": response_id,
                "item_id": item["id"],
                "output_index": index,
                "call_id": call.id,
                "name": call.name,
                "arguments": item["arguments"],
            }
        )
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response_id,
                "output_index": index,
                "item": item,
            }
        )
        return item


async def realtime(request: web.Request) -> web.StreamResponse:
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith("Bearer ") or not authorization.removeprefix("Bearer ").strip():
        return web.json_response({"error": {"message": "missing API key"}}, status=401)
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    session = RealtimeSession(
        ws, request.app[STATE_KEY], request.query.get("model", "gpt-realtime")
    )
    await session.run()
    return ws


def add_openai_realtime_routes(app: web.Application) -> None:
    app.router.add_get("/v1/realtime", realtime)
