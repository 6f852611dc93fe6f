"""OpenAI-compatible HTTP endpoints, as the livekit openai plugins call them.

- POST /v1/chat/completions: streaming (SSE `chat.completion.chunk`s with content and
  `tool_calls` deltas, a usage chunk when `stream_options.include_usage`, `data: [DONE]`)
  and non-streaming. Used by `openai.LLM(base_url=...)`.
- POST /v1/audio/speech: espeak-ng speech at 24 kHz in the requested `response_format`
  (pcm, wav, mp3, opus, aac, flac), as raw chunked audio or, for `stream_format=sse`, as
  `speech.audio.delta` / `speech.audio.done` events. Used by `openai.TTS(base_url=...)`,
  which asks for mp3 and sse unless told otherwise.
- POST /v1/audio/transcriptions (multipart): decodes the audio, records its duration and
  loudness, answers the next scripted transcript. Used by `openai.STT(base_url=...)` with
  `use_realtime=False` (the default for whisper-1 and gpt-4o(-mini)-transcribe).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
import uuid
from typing import Any

from aiohttp import web

import voicefleet_testkit.providers.audio as audio  # the module, not the package (no cycle)
from voicefleet_testkit.providers.script import (
    REQUIRED_API_KEY,
    STATE_KEY,
    LLMReply,
    api_key_fingerprint,
    message_text,
)

log = logging.getLogger(__name__)

TTS_SAMPLE_RATE = 24000  # what the openai TTS plugin (and OpenAI's pcm format) use
TTS_CHUNK_SECONDS = 0.2  # audio per streamed chunk, so TTS has a first byte before the end
DEFAULT_TTS_FORMAT = "mp3"

# OpenAI answers verbose_json with the language's English name.
_LANGUAGE_NAMES = {
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "nl": "dutch",
    "pt": "portuguese",
}


def openai_error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": None}}
    return web.json_response(body, status=status)


def _estimate_tokens(text: str) -> int:
    # About four characters a token, as OpenAI's own rule of thumb; only used for usage figures.
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [message_text(m) for m in body.get("messages", []) if isinstance(m, dict)]
    if body.get("tools"):
        parts.append(json.dumps(body["tools"]))
    return "\n".join(parts)


def _usage(body: dict[str, Any], reply: LLMReply) -> dict[str, Any]:
    prompt = _estimate_tokens(_prompt_text(body))
    completion = _estimate_tokens(
        reply.text + "".join(json.dumps(c.arguments) for c in reply.tool_calls)
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _split_words(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def _split_in_three(text: str) -> list[str]:
    # Arguments arrive in pieces, as from OpenAI, so clients must accumulate them.
    step = max(1, math.ceil(len(text) / 3))
    return [text[i : i + step] for i in range(0, len(text), step)] or [""]


def _check_api_key(request: web.Request) -> web.Response | None:
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith("Bearer ") or not authorization[7:].strip():
        return openai_error(
            401,
            "You didn't provide an API key (Authorization: Bearer ...).",
            error_type="invalid_request_error",
        )
    required = request.app[REQUIRED_API_KEY]
    if required is not None and authorization[7:].strip() != required:
        return openai_error(401, "Incorrect API key provided.", error_type="invalid_request_error")
    return None


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return openai_error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return openai_error(400, "The request body must be a JSON object.")
    return body


# --- chat completions ------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    if (denied := _check_api_key(request)) is not None:
        return denied
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return openai_error(400, "'messages' must be a non-empty array.", param="messages")
    if not isinstance(body.get("model"), str):
        return openai_error(400, "you must provide a model parameter", param="model")

    state = request.app[STATE_KEY]
    reply = state.next_llm_reply(messages, body.get("tools"))
    entry = state.record(
        "chat",
        {
            "body": body,
            "api_key_sha256": api_key_fingerprint(request.headers.get("Authorization")),
            "reply": reply.to_json(),
        },
    )
    log.info("chat %s -> %s", entry["body"].get("model"), reply.to_json())
    if reply.delay:
        await asyncio.sleep(reply.delay)
    if reply.error_status:
        return openai_error(
            reply.error_status,
            "Scripted failure from the test provider.",
            error_type="server_error",
        )

    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.get("stream"):
        return await _stream_completion(request, body, reply, completion_id, created)

    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or None,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in reply.tool_calls
        ]
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body["model"],
            "system_fingerprint": "fp_voicefleet",
            "service_tier": "default",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": _usage(body, reply),
        }
    )


async def _stream_completion(
    request: web.Request, body: dict[str, Any], reply: LLMReply, completion_id: str, created: int
) -> web.StreamResponse:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body["model"],
            "system_fingerprint": "fp_voicefleet",
            "service_tier": "default",
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = usage
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

    def delta(content: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}]

    await send(delta({"role": "assistant", "content": "", "refusal": None}))
    for word in _split_words(reply.text):
        await send(delta({"content": word}))
    for index, call in enumerate(reply.tool_calls):
        first = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        await send(delta({"tool_calls": [first]}))
        for piece in _split_in_three(json.dumps(call.arguments)):
            await send(delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    await send(delta({}, "tool_calls" if reply.tool_calls else "stop"))
    if include_usage:
        await send([], _usage(body, reply))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# --- speech ----------------------------------------------------------------------------------


async def audio_speech(request: web.Request) -> web.StreamResponse:
    if (denied := _check_api_key(request)) is not None:
        return denied
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return openai_error(400, "'input' must be a non-empty string.", param="input")
    response_format = body.get("response_format") or DEFAULT_TTS_FORMAT
    if response_format not in audio.CONTENT_TYPES:
        return openai_error(
            400,
            f"Invalid response_format {response_format!r}; "
            f"supported: {', '.join(sorted(audio.CONTENT_TYPES))}.",
            param="response_format",
        )
    speed = float(body.get("speed") or 1.0)
    if not 0.25 <= speed <= 4.0:
        return openai_error(400, "'speed' must be between 0.25 and 4.0.", param="speed")
    stream_format = body.get("stream_format") or "audio"

    started = time.monotonic()
    speech = await audio.synthesize(
        text,
        words_per_minute=round(audio.DEFAULT_WORDS_PER_MINUTE * speed),
        sample_rate=TTS_SAMPLE_RATE,
    )
    encoded, content_type = await asyncio.to_thread(audio.encode_audio, speech, response_format)
    state = request.app[STATE_KEY]
    state.record(
        "tts",
        {
            "provider": "openai",
            "text": text,
            "characters": len(text),
            "model": body.get("model"),
            "voice": body.get("voice"),
            "response_format": response_format,
            "stream_format": stream_format,
            "audio_seconds": round(speech.duration, 3),
            "synthesis_seconds": round(time.monotonic() - started, 3),
            "api_key_sha256": api_key_fingerprint(request.headers.get("Authorization")),
        },
    )
    log.info("tts %r -> %.2fs of %s (%s)", text, speech.duration, response_format, stream_format)

    # Chunks of about TTS_CHUNK_SECONDS of audio, whatever the encoding.
    chunk_count = max(1, math.ceil(speech.duration / TTS_CHUNK_SECONDS))
    chunk_size = max(1, math.ceil(len(encoded) / chunk_count))
    chunks = [encoded[i : i + chunk_size] for i in range(0, len(encoded), chunk_size)]

    if stream_format == "sse":
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for chunk in chunks:
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        input_tokens = _estimate_tokens(text)
        output_tokens = math.ceil(speech.duration * 50)  # rough audio-token rate, for usage only
        done = {
            "type": "speech.audio.done",
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
        await response.write(f"data: {json.dumps(done)}\n\n".encode())
        await response.write_eof()
        return response

    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


# --- transcription ---------------------------------------------------------------------------


async def audio_transcriptions(request: web.Request) -> web.Response:
    if (denied := _check_api_key(request)) is not None:
        return denied
    try:
        form = await request.post()
    except ValueError as error:
        return openai_error(400, f"Expected a multipart/form-data body: {error}")
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        return openai_error(400, "'file' is required (multipart file field).", param="file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "'model' is required.", param="model")
    response_format = str(form.get("response_format") or "json")
    language = str(form.get("language") or "")

    data = upload.file.read()
    try:
        received = await asyncio.to_thread(audio.decode_audio, data)
    except Exception as error:  # PyAV raises many kinds for bad input
        return openai_error(
            400,
            f"Audio file might be corrupted or unsupported ({type(error).__name__}).",
            param="file",
        )

    state = request.app[STATE_KEY]
    silent = audio.is_silent(received.samples)
    # Like a real recogniser, silence transcribes to nothing and leaves the script untouched.
    scripted = False
    if silent:
        transcript_text, delay = "", 0.0
    else:
        transcript, scripted = state.next_transcript()
        transcript_text, delay = transcript.text, transcript.delay
    state.record(
        "stt",
        {
            "provider": "openai",
            "model": model,
            "language": language or None,
            "response_format": response_format,
            "filename": upload.filename,
            "content_type": upload.content_type,
            "sample_rate": received.sample_rate,
            "audio_seconds": round(received.duration, 3),
            "rms": round(received.rms, 5),
            "dbfs": round(audio.dbfs(received.rms), 1) if received.rms > 0 else None,
            "silent": silent,
            "transcript": transcript_text,
            "scripted": scripted,
            "api_key_sha256": api_key_fingerprint(request.headers.get("Authorization")),
        },
    )
    log.info("stt %.2fs rms=%.4f -> %r", received.duration, received.rms, transcript_text)
    if delay:
        await asyncio.sleep(delay)

    usage = {"type": "duration", "seconds": math.ceil(received.duration)}
    if response_format == "text":
        return web.Response(text=transcript_text + "\n", content_type="text/plain")
    if response_format in ("srt", "vtt"):
        end = _timestamp(received.duration, "," if response_format == "srt" else ".")
        start = _timestamp(0.0, "," if response_format == "srt" else ".")
        if response_format == "srt":
            text = f"1\n{start} --> {end}\n{transcript_text}\n"
        else:
            text = f"WEBVTT\n\n{start} --> {end}\n{transcript_text}\n"
        return web.Response(text=text, content_type="text/plain")
    if response_format == "verbose_json":
        return web.json_response(
            {
                "task": "transcribe",
                "language": _LANGUAGE_NAMES.get(language.split("-")[0], "english"),
                "duration": round(received.duration, 3),
                "text": transcript_text,
                "segments": [
                    {
                        "id": 0,
                        "seek": 0,
                        "start": 0.0,
                        "end": round(received.duration, 3),
                        "text": transcript_text,
                        "tokens": [],
                        "temperature": 0.0,
                        "avg_logprob": -0.1,
                        "compression_ratio": 1.0,
                        "no_speech_prob": 0.0,
                    }
                ]
                if transcript_text
                else [],
                "usage": usage,
            }
        )
    if response_format != "json":
        return openai_error(
            400, f"Invalid response_format {response_format!r}.", param="response_format"
        )
    return web.json_response({"text": transcript_text, "usage": usage})


def _timestamp(seconds: float, decimal_mark: str) -> str:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    return (
        f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}{decimal_mark}{millis:03d}"
    )


async def list_models(request: web.Request) -> web.Response:
    names = ["gpt-4o-mini", "gpt-4.1", "gpt-4o-mini-tts", "tts-1", "gpt-4o-mini-transcribe"]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "voicefleet"} for n in names
            ],
        }
    )


def add_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/audio/speech", audio_speech)
    app.router.add_post("/v1/audio/transcriptions", audio_transcriptions)
    app.router.add_get("/v1/models", list_models)
