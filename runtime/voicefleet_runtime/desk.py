"""The platform desk: speaks to callers of a fleet that has no worker to do it.

`python -m voicefleet_runtime desk` runs it (the chart's `<release>-desk` Deployment, in the
platform namespace, from the runtime image). The operator's standby holds a caller while a fleet
at zero starts its first worker (operator wake.py); with `spec.overflow.holdMessage` set it asks
the desk (POST /holds, desk_contract.py) to join the caller's room and say it:

- a phone call is answered by that (livekit-sip answers once an agent publishes audio, which
  the operator's standby cannot: it speaks LiveKit's agent protocol, not WebRTC), so the
  caller hears the message instead of ringing, and the call is established: when no worker
  comes in time, the operator can give every overflow action (a message, a transfer: livekit-sip
  refuses to REFER a call it has not answered);
- the desk then stays in the room, silent, and leaves the moment an agent of the fleet joins
  (the woken worker took the call), when every caller has left, after `maxSeconds`, or when
  the operator ends the hold (DELETE) or finishes it (POST .../finish: the overflow message,
  then it leaves and the operator hangs up or transfers).

Why a platform process and not the tenant's: no process of a tenant runs while its fleet is at
zero. The desk speaks with the platform's TTS (VOICEFLEET_DESK_TTS, Helm `desk.tts`, the
platform's provider key): a tenant's provider key stays in the tenant's worker namespace, and a
tenant's `pipeline.tts.baseUrl` never receives the platform's key. It holds no LiveKit
credential (each request carries a token the operator minted for that room alone), so a
request to it can do nothing in a room its sender could not already join.

Each message is synthesised once and kept (MESSAGE_CACHE entries): holding a caller costs a room
join and the playout, no TTS request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from livekit import rtc
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import ValidationError

from voicefleet_runtime.config import TtsConfig
from voicefleet_runtime.desk_contract import (
    DEFAULT_DESK_PORT,
    DESK_ATTRIBUTE,
    Finished,
    FinishRequest,
    HoldRequest,
    HoldStarted,
)
from voicefleet_runtime.overflow import (
    AGENT_NAME_ATTRIBUTE,
    callers,
    first_caller,
    play_frames,
    wait_answered,
)
from voicefleet_runtime.pipeline import build_tts
from voicefleet_runtime.telephony import is_phone_participant

logger = logging.getLogger("voicefleet.desk")

MESSAGE_CACHE = 128
"""Synthesised messages kept (a few seconds of 24 kHz audio each: ~0.2 MB)."""
ANSWER_WAIT_SECONDS = 10.0
"""From the desk's track published to livekit-sip answering the call."""
CALLER_WAIT_SECONDS = 10.0
"""A hold request comes after the caller joined (the operator saw the dispatch); a little slack."""
SUBSCRIBE_WAIT_SECONDS = 2.0
"""A WebRTC caller subscribes to the desk's track within this (else the message plays anyway)."""


@dataclass
class Speech:
    frames: list[rtc.AudioFrame]
    """In the voice's audio format (Voice.audio_format)."""

    @property
    def seconds(self) -> float:
        return sum(frame.duration for frame in self.frames)


class Voice:
    """The platform's TTS, each text synthesised once (concurrent requests for the same text
    share one synthesis). One TTS client for the desk's life, built by `warm` at start: the
    plugin's import and its HTTP client's SSL context took ~2 s on a busy node, on the first
    caller's path otherwise."""

    def __init__(self, config: TtsConfig) -> None:
        self.config = config
        self._said: OrderedDict[str, asyncio.Task[Speech]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._tts: Any = None

    def warm(self) -> None:
        """Build the TTS client now (in a running event loop)."""
        self._client()

    def _client(self) -> Any:
        if self._tts is None:
            # Outside a job livekit-agents has no HTTP session to lend the plugins.
            self._session = aiohttp.ClientSession()
            self._tts = build_tts(self.config, http_session=self._session)
        return self._tts

    def audio_format(self) -> tuple[int, int]:
        """(sample rate, channels) of this voice's audio."""
        tts = self._client()
        return tts.sample_rate, tts.num_channels

    async def speech(self, text: str) -> Speech:
        task = self._said.get(text)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.create_task(self._synthesise(text), name="desk-tts")
            self._said[text] = task
            while len(self._said) > MESSAGE_CACHE:
                self._said.popitem(last=False)
        self._said.move_to_end(text)
        return await asyncio.shield(task)

    async def _synthesise(self, text: str) -> Speech:
        tts = self._client()
        frames: list[rtc.AudioFrame] = []
        started = time.monotonic()
        async with tts.synthesize(text) as stream:
            async for audio in stream:
                frames.append(audio.frame)
        speech = Speech(frames)
        logger.info(
            "synthesised a message once: %.1fs of audio in %.2fs",
            speech.seconds,
            time.monotonic() - started,
        )
        return speech

    async def aclose(self) -> None:
        if self._tts is not None:
            await self._tts.aclose()
        if self._session is not None:
            await self._session.close()


class DeskMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.holds = Counter(
            "voicefleet_desk_holds",
            "Callers the desk held while their fleet woke, by how the hold ended "
            "(handed_over, caller_left, finished, ended, expired, failed)",
            ["result"],
            registry=self.registry,
        )
        self.holding = Gauge(
            "voicefleet_desk_holding",
            "Callers the desk holds now",
            registry=self.registry,
        )


@dataclass
class Hold:
    request: HoldRequest
    room: rtc.Room
    source: rtc.AudioSource
    subscribed: asyncio.Event
    """Someone subscribed to the desk's track (audio sent before that is lost)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    result: str = "expired"
    playing: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None

    def end(self, result: str) -> None:
        if not self.ended.is_set():
            self.result = result
            self.ended.set()


def agent_of_fleet_joined(room: rtc.Room, agent_name: str) -> bool:
    """An agent of the fleet is in the room (the woken worker took the call)."""
    return any(
        participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        and participant.attributes.get(AGENT_NAME_ATTRIBUTE) == agent_name
        for participant in room.remote_participants.values()
    )


class Desk:
    """The holds the desk runs, by room."""

    def __init__(self, livekit_url: str, voice: Voice) -> None:
        self.livekit_url = livekit_url
        self.voice = voice
        self.holds: dict[str, Hold] = {}
        self.metrics = DeskMetrics()

    async def hold(self, request: HoldRequest) -> HoldStarted:
        started = time.monotonic()
        if request.room in self.holds:
            return HoldStarted(room=request.room, joined_seconds=0.0)
        speech_task = asyncio.create_task(self._speech(request.message))
        room = rtc.Room()
        subscribed = asyncio.Event()
        room.on("local_track_subscribed", lambda *_: subscribed.set())
        try:
            await room.connect(
                self.livekit_url, request.token, rtc.RoomOptions(auto_subscribe=False)
            )
            # Published before the message is synthesised: the answer does not wait for it.
            rate, channels = self.voice.audio_format()
            source = rtc.AudioSource(rate, channels)
            track = rtc.LocalAudioTrack.create_audio_track("desk", source)
            await room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
        except BaseException:
            speech_task.cancel()
            with contextlib.suppress(Exception):
                await room.disconnect()
            self.metrics.holds.labels("failed").inc()
            raise
        hold = Hold(request, room, source, subscribed)
        self.holds[request.room] = hold
        self.metrics.holding.inc()
        hold.playing = asyncio.create_task(
            self._greet(hold, speech_task), name=f"desk-say {request.room}"
        )
        hold.watcher = asyncio.create_task(self._watch(hold), name=f"desk-hold {request.room}")
        joined = time.monotonic() - started
        logger.info(
            "holding the caller of room %s for %s (joined and published in %.2fs)",
            request.room,
            request.agent_name,
            joined,
        )
        return HoldStarted(room=request.room, joined_seconds=round(joined, 3))

    async def _greet(self, hold: Hold, speech: asyncio.Task[Speech | None]) -> None:
        """The holding message, once the caller can hear it."""
        try:
            if await _caller_can_hear(hold) and (said := await speech) is not None:
                await play_frames(hold.source, said.frames)
        except Exception:
            logger.exception("room %s: the holding message failed", hold.request.room)
        finally:
            speech.cancel()

    async def _speech(self, text: str | None) -> Speech | None:
        return None if text is None else await self.voice.speech(text)

    async def _watch(self, hold: Hold) -> None:
        """End the hold when its fleet's agent joins, the callers leave, or it expires."""
        request = hold.request
        deadline = time.monotonic() + request.max_seconds
        seen_caller = False
        while not hold.ended.is_set():
            if agent_of_fleet_joined(hold.room, request.agent_name):
                hold.end("handed_over")
            elif callers(hold.room):
                seen_caller = True
            elif seen_caller or not hold.room.isconnected():
                hold.end("caller_left")
            if time.monotonic() >= deadline:
                hold.end("expired")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.ended.wait(), 0.05)
        await self._leave(hold)

    async def _leave(self, hold: Hold) -> None:
        if self.holds.get(hold.request.room) is not hold:
            return
        del self.holds[hold.request.room]
        if hold.playing is not None:
            hold.playing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await hold.playing
        hold.source.clear_queue()
        with contextlib.suppress(Exception):
            await hold.source.aclose()
        with contextlib.suppress(Exception):
            await hold.room.disconnect()
        self.metrics.holding.dec()
        self.metrics.holds.labels(hold.result).inc()
        logger.info("room %s: left (%s)", hold.request.room, hold.result)

    async def finish(self, room_name: str, request: FinishRequest) -> Finished | None:
        """The overflow message instead of the holding message, then leave."""
        hold = self.holds.get(room_name)
        if hold is None:
            return None
        if hold.playing is not None:
            hold.playing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await hold.playing
        hold.source.clear_queue()
        spoken = 0.0
        with contextlib.suppress(Exception):
            await hold.room.local_participant.set_attributes({DESK_ATTRIBUTE: "overflow"})
        speech = await self.voice.speech(request.message)
        if await _caller_can_hear(hold):
            hold.playing = asyncio.create_task(play_frames(hold.source, speech.frames))
            # Cancelled when the hold ends meanwhile (the caller hung up): nothing more to say.
            with contextlib.suppress(asyncio.CancelledError):
                await hold.playing
                spoken = speech.seconds
        logger.info(
            "room %s: said the overflow message (%s, %.1fs of audio)",
            room_name,
            request.reason,
            spoken,
        )
        hold.playing = None
        hold.end("finished")
        if hold.watcher is not None:
            await hold.watcher
        return Finished(room=room_name, spoken_seconds=round(spoken, 3))

    async def end(self, room_name: str) -> bool:
        hold = self.holds.get(room_name)
        if hold is None:
            return False
        hold.end("ended")
        if hold.watcher is not None:
            await hold.watcher
        return True

    async def aclose(self) -> None:
        for hold in list(self.holds.values()):
            hold.end("ended")
        watchers = [h.watcher for h in self.holds.values() if h.watcher is not None]
        await asyncio.gather(*watchers, return_exceptions=True)
        await self.voice.aclose()


async def _caller_can_hear(hold: Hold) -> bool:
    """Until the caller can hear the desk: a phone call answered (livekit-sip answers once it
    subscribed to the desk's track), a WebRTC caller subscribed (or SUBSCRIBE_WAIT_SECONDS).
    False when no caller came or the call was not answered."""
    caller = await first_caller(hold.room, CALLER_WAIT_SECONDS)
    if caller is None:
        return False
    if is_phone_participant(caller):
        if await wait_answered(caller, ANSWER_WAIT_SECONDS):
            return True
        logger.warning("room %s: the phone call was not answered", hold.request.room)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hold.subscribed.wait(), SUBSCRIBE_WAIT_SECONDS)
    return True


# --- HTTP -----------------------------------------------------------------------------------


def _problems(error: ValidationError, where: str) -> str:
    """Each bad field and why; `where` names the whole value."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or where}: {e['msg']}" for e in error.errors()
    )


def _bad_request(error: ValidationError) -> web.Response:
    return web.json_response({"error": _problems(error, "(body)")}, status=400)


def make_app(desk: Desk) -> web.Application:
    async def post_hold(request: web.Request) -> web.Response:
        try:
            hold = HoldRequest.model_validate_json(await request.read())
        except ValidationError as error:
            return _bad_request(error)
        try:
            started = await desk.hold(hold)
        except Exception as error:  # the room, the token or the TTS: the operator rings on
            logger.warning("room %s: could not hold the caller: %s", hold.room, error)
            return web.json_response({"error": str(error)}, status=502)
        return web.json_response(started.model_dump(by_alias=True), status=201)

    async def post_finish(request: web.Request) -> web.Response:
        try:
            finish = FinishRequest.model_validate_json(await request.read())
        except ValidationError as error:
            return _bad_request(error)
        room = request.match_info["room"]
        try:
            finished = await desk.finish(room, finish)
        except Exception as error:
            logger.warning("room %s: could not say the overflow message: %s", room, error)
            await desk.end(room)
            return web.json_response({"error": str(error)}, status=502)
        if finished is None:
            return web.json_response({"error": f"no hold in room {room}"}, status=404)
        return web.json_response(finished.model_dump(by_alias=True))

    async def delete_hold(request: web.Request) -> web.Response:
        room = request.match_info["room"]
        if not await desk.end(room):
            return web.json_response({"error": f"no hold in room {room}"}, status=404)
        return web.Response(status=204)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(desk.metrics.registry), content_type="text/plain")

    app = web.Application()
    app.add_routes(
        [
            web.post("/holds", post_hold),
            web.post("/holds/{room}/finish", post_finish),
            web.delete("/holds/{room}", delete_hold),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    return app


class DeskSettingsError(ValueError):
    pass


def settings_from_environment(environ: dict[str, str] | None = None) -> tuple[str, TtsConfig, int]:
    """(LiveKit URL, the platform's TTS, port) from VOICEFLEET_DESK_LIVEKIT_URL,
    VOICEFLEET_DESK_TTS (JSON, like a VoiceAgent's spec.pipeline.tts) and VOICEFLEET_DESK_PORT."""
    env = os.environ if environ is None else environ
    url = env.get("VOICEFLEET_DESK_LIVEKIT_URL", "")
    if not url.startswith(("ws://", "wss://", "http://", "https://")):
        raise DeskSettingsError(
            "VOICEFLEET_DESK_LIVEKIT_URL: set it to the LiveKit server URL (ws:// or wss://); "
            f"got {url!r}"
        )
    try:
        tts = TtsConfig.model_validate_json(env.get("VOICEFLEET_DESK_TTS") or "{}")
    except ValidationError as error:
        raise DeskSettingsError(
            f"VOICEFLEET_DESK_TTS: {_problems(error, '(value)')} (a JSON object like "
            'spec.pipeline.tts, e.g. {"provider": "openai", "voice": "alloy"})'
        ) from None
    port_text = env.get("VOICEFLEET_DESK_PORT") or str(DEFAULT_DESK_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeskSettingsError(f"VOICEFLEET_DESK_PORT: a TCP port; got {port_text!r}")
    return url, tts, int(port_text)


async def serve(url: str, tts: TtsConfig, port: int, stop: asyncio.Event) -> None:
    voice = Voice(tts)
    voice.warm()
    # The native WebRTC library loads on first use: now, not on the first caller's path.
    await rtc.AudioSource(*voice.audio_format()).aclose()
    desk = Desk(url, voice)
    runner = web.AppRunner(make_app(desk), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host=None, port=port).start()
    logger.info("desk listening on :%d (LiveKit %s, TTS %s)", port, url, tts.provider)
    try:
        await stop.wait()
    finally:
        await desk.aclose()
        await runner.cleanup()
