"""Deepgram-compatible speech-to-text, as the livekit deepgram plugin (`deepgram.STT`) calls it.

- WebSocket /v1/listen (streaming): linear16 audio in, `SpeechStarted` / `Results` (interim and
  final) / `UtteranceEnd` / `Metadata` out. Speech is found by loudness: an utterance starts
  after MIN_VOICED_S of sound and ends after `endpointing` ms of quiet (at least
  MIN_ENDPOINT_S, because espeak-ng leaves short gaps between words); a `Finalize` message
  ends it at once. Each utterance is answered with the next scripted transcript.
- POST /v1/listen (pre-recorded): an audio file in, one transcript out.

Point the plugin at it with `deepgram.STT(base_url=f"{providers.url}/v1/listen", api_key=...)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

import voicefleet_testkit.providers.audio as audio  # the module, not the package (no cycle)
from voicefleet_testkit.providers.script import (
    REQUIRED_API_KEY,
    STATE_KEY,
    ProviderState,
    api_key_fingerprint,
)

log = logging.getLogger(__name__)

WINDOW_S = 0.02  # loudness is judged per 20 ms
SPEECH_RMS = 0.01  # about -40 dBFS: espeak-ng speech is -20 dBFS, silence is digital zero
MIN_VOICED_S = 0.06
MIN_ENDPOINT_S = 0.3
NO_ENDPOINTING_FINAL_S = 1.0  # with endpointing=false, still finalize after this much quiet
INTERIM_EVERY_S = 0.4
MODEL_INFO = {"name": "voicefleet-local", "version": "2026-01-01", "arch": "nova-3"}


def _check_token(request: web.Request) -> web.Response | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        return web.json_response(
            {
                "err_code": "INVALID_AUTH",
                "err_msg": "Invalid credentials: send 'Authorization: Token <key>'.",
            },
            status=401,
        )
    required = request.app[REQUIRED_API_KEY]
    if required is not None and key.strip() != required:
        return web.json_response(
            {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials."}, status=401
        )
    return None


def _words(transcript: str, start: float, end: float) -> list[dict[str, Any]]:
    tokens = transcript.split()
    if not tokens:
        return []
    step = max(end - start, 0.01) / len(tokens)
    return [
        {
            "word": token.strip(".,!?;:").lower(),
            "start": round(start + i * step, 3),
            "end": round(start + (i + 1) * step, 3),
            "confidence": 0.99,
            "punctuated_word": token,
        }
        for i, token in enumerate(tokens)
    ]


def _alternative(transcript: str, start: float, end: float) -> dict[str, Any]:
    return {
        "transcript": transcript,
        "confidence": 0.99 if transcript else 0.0,
        "words": _words(transcript, start, end),
    }


@dataclass
class _Utterance:
    start: float
    last_voiced: float
    transcript: str
    scripted: bool
    delay: float
    levels: list[float] = field(default_factory=list)
    last_interim: float = 0.0


@dataclass
class _ListenSession:
    """One streaming connection: tracks audio time and the utterance in progress."""

    state: ProviderState
    params: dict[str, str]
    api_key_sha256: str | None
    sample_rate: int
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    cursor: float = 0.0  # seconds of audio received
    pending: bytearray = field(default_factory=bytearray)
    voiced_run: float = 0.0
    utterance: _Utterance | None = None

    @property
    def interim_results(self) -> bool:
        return self.params.get("interim_results", "false") == "true"

    @property
    def vad_events(self) -> bool:
        return self.params.get("vad_events", "false") == "true"

    @property
    def endpoint_s(self) -> float | None:
        value = self.params.get("endpointing", "10")
        if value == "false":
            return None
        return max(float(value) / 1000, MIN_ENDPOINT_S)

    def _results(
        self, utterance: _Utterance, text: str, *, is_final: bool, speech_final: bool
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(self.cursor - utterance.start, 3),
            "start": round(utterance.start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": False,
            "channel": {
                "alternatives": [_alternative(text, utterance.start, utterance.last_voiced)]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": MODEL_INFO,
                "model_uuid": "00000000-0000-0000-0000-000000000000",
            },
        }

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Take linear16 audio; return the messages it triggers, in order."""
        self.pending.extend(data)
        window_bytes = int(self.sample_rate * WINDOW_S) * 2
        events: list[dict[str, Any]] = []
        while len(self.pending) >= window_bytes:
            window = np.frombuffer(bytes(self.pending[:window_bytes]), dtype="<i2")
            del self.pending[:window_bytes]
            self.cursor += WINDOW_S
            events += self._window(audio.rms(window.astype(np.int16)))
        return events

    def _window(self, level: float) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        utterance = self.utterance
        if level >= SPEECH_RMS:
            self.voiced_run += WINDOW_S
            if utterance is None and self.voiced_run >= MIN_VOICED_S - 1e-9:
                transcript, scripted = self.state.next_transcript()
                utterance = self.utterance = _Utterance(
                    start=self.cursor - self.voiced_run,
                    last_voiced=self.cursor,
                    transcript=transcript.text,
                    scripted=scripted,
                    delay=transcript.delay,
                    last_interim=self.cursor,
                )
                if self.vad_events:
                    events.append(
                        {
                            "type": "SpeechStarted",
                            "channel": [0, 1],
                            "timestamp": round(utterance.start, 3),
                        }
                    )
            if utterance is not None:
                utterance.last_voiced = self.cursor
                utterance.levels.append(level)
        else:
            self.voiced_run = 0.0
            if utterance is not None:
                utterance.levels.append(level)
        if utterance is None:
            return events

        quiet = self.cursor - utterance.last_voiced
        endpoint = self.endpoint_s
        if endpoint is not None and quiet >= endpoint:
            events += self.finish(speech_final=True)
        elif endpoint is None and quiet >= NO_ENDPOINTING_FINAL_S:
            events += self.finish(speech_final=False)
        elif self.interim_results and self.cursor - utterance.last_interim >= INTERIM_EVERY_S:
            utterance.last_interim = self.cursor
            words = utterance.transcript.split()
            # Reveal the transcript a word per 0.3 s of speech, never all of it before the end.
            shown = min(len(words) - 1, int((self.cursor - utterance.start) / 0.3))
            if shown > 0:
                events.append(
                    self._results(
                        utterance, " ".join(words[:shown]), is_final=False, speech_final=False
                    )
                )
        return events

    def finish(self, *, speech_final: bool, from_finalize: bool = False) -> list[dict[str, Any]]:
        """End the utterance in progress (if any) with a final result."""
        utterance = self.utterance
        if utterance is None:
            if not from_finalize:
                return []
            empty = _Utterance(self.cursor, self.cursor, "", False, 0.0)
            result = self._results(empty, "", is_final=True, speech_final=False)
            result["from_finalize"] = True
            return [result]
        self.utterance = None
        self.voiced_run = 0.0
        levels = np.array(utterance.levels or [0.0])
        self.state.record(
            "stt",
            {
                "provider": "deepgram",
                "model": self.params.get("model"),
                "language": self.params.get("language"),
                "sample_rate": self.sample_rate,
                "audio_seconds": round(utterance.last_voiced - utterance.start, 3),
                "rms": round(float(np.sqrt(np.mean(levels**2))), 5),
                "silent": False,
                "transcript": utterance.transcript,
                "scripted": utterance.scripted,
                "from_finalize": from_finalize,
                "api_key_sha256": self.api_key_sha256,
            },
        )
        log.info(
            "deepgram utterance %.2fs -> %r", self.cursor - utterance.start, utterance.transcript
        )
        result = self._results(
            utterance, utterance.transcript, is_final=True, speech_final=speech_final
        )
        result["from_finalize"] = from_finalize
        events = [result]
        if "utterance_end_ms" in self.params:
            events.append(
                {
                    "type": "UtteranceEnd",
                    "channel": [0, 1],
                    "last_word_end": round(utterance.last_voiced, 3),
                }
            )
        if utterance.delay:
            events.insert(0, {"__delay__": utterance.delay})
        return events

    def metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "duration": round(self.cursor, 3),
            "channels": 1,
            "models": [MODEL_INFO["name"]],
            "model_info": {MODEL_INFO["name"]: MODEL_INFO},
        }


def _bad_request(message: str) -> web.Response:
    return web.json_response({"err_code": "Bad Request", "err_msg": message}, status=400)


async def listen(request: web.Request) -> web.StreamResponse:
    if (denied := _check_token(request)) is not None:
        return denied
    params = dict(request.query)
    if request.method == "POST":
        return await _prerecorded(request, params)

    encoding = params.get("encoding", "linear16")
    if encoding != "linear16":
        return _bad_request(f"encoding {encoding!r} is not supported here; use linear16")
    if params.get("channels", "1") != "1":
        return _bad_request("only channels=1 is supported")
    try:
        sample_rate = int(params.get("sample_rate", "16000"))
    except ValueError:
        return _bad_request("sample_rate must be an integer")

    ws = web.WebSocketResponse()
    await ws.prepare(request)
    session = _ListenSession(
        state=request.app[STATE_KEY],
        params=params,
        api_key_sha256=api_key_fingerprint(request.headers.get("Authorization")),
        sample_rate=sample_rate,
    )

    async def send(events: list[dict[str, Any]]) -> None:
        for event in events:
            if "__delay__" in event:
                await asyncio.sleep(event["__delay__"])
                continue
            await ws.send_str(json.dumps(event))

    async for message in ws:
        if message.type == WSMsgType.BINARY:
            await send(session.feed(message.data))
        elif message.type == WSMsgType.TEXT:
            try:
                control = json.loads(message.data)
            except json.JSONDecodeError:
                await ws.send_str(json.dumps({"type": "Error", "description": "invalid JSON"}))
                continue
            kind = control.get("type")
            if kind == "Finalize":
                await send(session.finish(speech_final=False, from_finalize=True))
            elif kind == "CloseStream":
                await send(session.finish(speech_final=True))
                await ws.send_str(json.dumps(session.metadata()))
                await ws.close()
            # KeepAlive needs no answer.
        elif message.type == WSMsgType.ERROR:
            break
    return ws


async def _prerecorded(request: web.Request, params: dict[str, str]) -> web.Response:
    data = await request.read()
    try:
        received = await asyncio.to_thread(audio.decode_audio, data)
    except Exception as error:  # PyAV raises many kinds for bad input
        return _bad_request(f"could not decode the audio ({type(error).__name__})")
    state = request.app[STATE_KEY]
    silent = audio.is_silent(received.samples)
    text, scripted = "", False
    if not silent:
        transcript, scripted = state.next_transcript()
        text = transcript.text
    state.record(
        "stt",
        {
            "provider": "deepgram",
            "model": params.get("model"),
            "language": params.get("language"),
            "sample_rate": received.sample_rate,
            "audio_seconds": round(received.duration, 3),
            "rms": round(received.rms, 5),
            "silent": silent,
            "transcript": text,
            "scripted": scripted,
            "api_key_sha256": api_key_fingerprint(request.headers.get("Authorization")),
        },
    )
    return web.json_response(
        {
            "metadata": {
                "request_id": str(uuid.uuid4()),
                "duration": round(received.duration, 3),
                "channels": 1,
                "models": [MODEL_INFO["name"]],
                "model_info": {MODEL_INFO["name"]: MODEL_INFO},
            },
            "results": {
                "channels": [{"alternatives": [_alternative(text, 0.0, received.duration)]}]
            },
        }
    )


def add_deepgram_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/v1/listen", listen)
    app.router.add_route("POST", "/v1/listen", listen)
