"""ElevenLabs-compatible text-to-speech, as the livekit elevenlabs plugin calls it.

- WebSocket /v1/text-to-speech/{voice_id}/multi-stream-input (what `TTS.stream()` and so an
  AgentSession use): per `context_id`, text is buffered and spoken (espeak-ng) when a message
  says `flush`, when CHUNK_CHARS have gathered (ElevenLabs' first chunk_length_schedule step),
  or when the context closes; audio comes back as base64 `audio` messages with character
  `alignment`, then `isFinal` once the context is closed.
- POST /v1/text-to-speech/{voice_id}/stream (what `TTS.synthesize()` uses): audio bytes.

`output_format` as ElevenLabs names it: mp3_<rate>_<kbps>, pcm_<rate>, opus_48000_<kbps>.
Point the plugin at it with `elevenlabs.TTS(base_url=f"{providers.url}/v1", api_key=...)`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

import voicefleet_testkit.providers.audio as audio  # the module, not the package (no cycle)
from voicefleet_testkit.providers.script import (
    REQUIRED_API_KEY,
    STATE_KEY,
    ProviderState,
    api_key_fingerprint,
)

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
CHUNK_CHARS = 120
AUDIO_MESSAGE_SECONDS = 0.25  # audio per websocket message


class OutputFormatError(ValueError):
    pass


def parse_output_format(output_format: str) -> tuple[str, int]:
    """("mp3"|"pcm"|"opus", sample rate) for an ElevenLabs output_format."""
    parts = output_format.split("_")
    if len(parts) < 2 or parts[0] not in ("mp3", "pcm", "opus") or not parts[1].isdigit():
        raise OutputFormatError(
            f"output_format {output_format!r} is not supported; use mp3_<rate>_<kbps>, "
            "pcm_<rate> or opus_48000_<kbps>"
        )
    return parts[0], int(parts[1])


def _check_key(request: web.Request) -> web.Response | None:
    key = request.headers.get("xi-api-key", "").strip()
    required = request.app[REQUIRED_API_KEY]
    if not key or (required is not None and key != required):
        detail = {"status": "invalid_api_key", "message": "Invalid or missing xi-api-key."}
        return web.json_response({"detail": detail}, status=401)
    return None


async def _speak(text: str, output_format: str) -> tuple[audio.PcmAudio, bytes]:
    codec, rate = parse_output_format(output_format)
    speech = await audio.synthesize(text, sample_rate=rate)
    encoded, _ = await asyncio.to_thread(audio.encode_audio, speech, codec)
    return speech, encoded


def _record(
    state: ProviderState,
    request: web.Request,
    text: str,
    speech: audio.PcmAudio,
    output_format: str,
    *,
    transport: str,
    model: str | None,
) -> None:
    state.record(
        "tts",
        {
            "provider": "elevenlabs",
            "text": text,
            "characters": len(text),
            "model": model,
            "voice": request.match_info.get("voice_id"),
            "response_format": output_format,
            "stream_format": transport,
            "audio_seconds": round(speech.duration, 3),
            "api_key_sha256": api_key_fingerprint(request.headers.get("xi-api-key")),
        },
    )


async def stream_http(request: web.Request) -> web.StreamResponse:
    if (denied := _check_key(request)) is not None:
        return denied
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return web.json_response({"detail": "body must be JSON"}, status=400)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        return web.json_response({"detail": "'text' must be a non-empty string"}, status=422)
    output_format = request.query.get("output_format", DEFAULT_OUTPUT_FORMAT)
    try:
        speech, encoded = await _speak(text, output_format)
    except OutputFormatError as error:
        return web.json_response({"detail": str(error)}, status=422)
    _record(
        request.app[STATE_KEY],
        request,
        text,
        speech,
        output_format,
        transport="http",
        model=body.get("model_id"),
    )
    content_type = {"mp3": "audio/mpeg", "pcm": "audio/pcm", "opus": "audio/ogg"}[
        parse_output_format(output_format)[0]
    ]
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    step = max(1, len(encoded) // max(1, round(speech.duration / AUDIO_MESSAGE_SECONDS)))
    for offset in range(0, len(encoded), step):
        await response.write(encoded[offset : offset + step])
    await response.write_eof()
    return response


@dataclass
class _Context:
    encoder: audio.StreamingEncoder  # one continuous stream per context, as ElevenLabs sends
    text: str = ""
    audio_ms: float = 0.0  # audio already sent, so alignment times keep counting up


async def multi_stream_input(request: web.Request) -> web.StreamResponse:
    if (denied := _check_key(request)) is not None:
        return denied
    output_format = request.query.get("output_format", DEFAULT_OUTPUT_FORMAT)
    try:
        codec_name, sample_rate = parse_output_format(output_format)
    except OutputFormatError as error:
        return web.json_response({"detail": str(error)}, status=422)
    model = request.query.get("model_id")
    with_alignment = request.query.get("sync_alignment", "false") == "true"
    state = request.app[STATE_KEY]

    ws = web.WebSocketResponse()
    await ws.prepare(request)
    contexts: dict[str, _Context] = {}
    send_lock = asyncio.Lock()

    async def speak(context_id: str, context: _Context, *, closing: bool) -> None:
        text, context.text = context.text.strip(), ""
        speech = audio.PcmAudio.silence(0, sample_rate)
        encoded = b""
        if text:
            speech = await audio.synthesize(text, sample_rate=sample_rate)
            encoded = await asyncio.to_thread(context.encoder.encode, speech)
            _record(state, request, text, speech, output_format, transport="websocket", model=model)
        if closing:
            encoded += await asyncio.to_thread(context.encoder.close)
        if not encoded:
            return
        duration = max(speech.duration, AUDIO_MESSAGE_SECONDS)
        pieces = max(1, round(duration / AUDIO_MESSAGE_SECONDS))
        step = max(1, -(-len(encoded) // pieces))
        chunks = [encoded[i : i + step] for i in range(0, len(encoded), step)]
        async with send_lock:
            for index, chunk in enumerate(chunks):
                message: dict[str, Any] = {
                    "audio": base64.b64encode(chunk).decode(),
                    "isFinal": None,
                    "contextId": context_id,
                }
                if text and with_alignment and index == 0:
                    # Characters spread evenly over the audio: enough for word timings.
                    char_ms = speech.duration * 1000 / len(text)
                    alignment = {
                        "chars": list(text + " "),
                        "charStartTimesMs": [
                            round(context.audio_ms + i * char_ms) for i in range(len(text) + 1)
                        ],
                        "charDurationsMs": [round(char_ms)] * (len(text) + 1),
                    }
                    message["alignment"] = alignment
                    message["normalizedAlignment"] = alignment
                await ws.send_str(json.dumps(message))
        context.audio_ms += speech.duration * 1000

    async for message in ws:
        if message.type == WSMsgType.ERROR:
            break
        if message.type != WSMsgType.TEXT:
            continue
        try:
            packet = json.loads(message.data)
        except json.JSONDecodeError:
            await ws.send_str(json.dumps({"error": "invalid JSON", "message": "invalid JSON"}))
            continue
        if packet.get("close_socket"):
            break
        context_id = str(packet.get("context_id") or packet.get("contextId") or "default")
        if context_id not in contexts:
            contexts[context_id] = _Context(audio.StreamingEncoder(codec_name, sample_rate))
        context = contexts[context_id]
        context.text += packet.get("text") or ""
        closing = bool(packet.get("close_context"))
        if packet.get("flush") or closing or len(context.text) >= CHUNK_CHARS:
            await speak(context_id, context, closing=closing)
        if closing:
            async with send_lock:
                await ws.send_str(json.dumps({"isFinal": True, "contextId": context_id}))
            contexts.pop(context_id, None)
    await ws.close()
    return ws


async def list_voices(request: web.Request) -> web.Response:
    if (denied := _check_key(request)) is not None:
        return denied
    voices = [{"voice_id": "local-espeak", "name": "espeak-ng en-us", "category": "premade"}]
    return web.json_response({"voices": voices})


def add_elevenlabs_routes(app: web.Application) -> None:
    app.router.add_get("/v1/text-to-speech/{voice_id}/multi-stream-input", multi_stream_input)
    app.router.add_post("/v1/text-to-speech/{voice_id}/stream", stream_http)
    app.router.add_post("/v1/text-to-speech/{voice_id}", stream_http)
    app.router.add_get("/v1/voices", list_voices)
