"""The overflow treatment, job side: what a caller beyond capacity gets (spec.overflow).

The main process decides (admission.py) and accepts the job with the participant attribute
`voicefleet.overflow=<reason>` in the agent's token; the job process sees it in its token claims
and runs this instead of the agent. It is a short job with no STT, LLM or VAD:

- WebRTC caller: the agent joins (the attribute is visible at once), speaks `overflow.message`
  with the pipeline's TTS, and leaves.
- Phone caller, sip.action reject: the call is still ringing (livekit-sip answers only when it
  subscribes to an agent's audio); the agent asks the caller's SIP participant to end it with
  the `lk.sip.EndCall` RPC, and livekit-sip sends the final response 486 Busy Here with our
  headers (X-VoiceFleet-Overflow, and a `Reason: SIP` header for 480/503). Nothing is published,
  so the call is never answered.
- Phone caller, message / transfer: publishing the agent's audio track makes livekit-sip answer;
  once the caller's participant says `sip.callStatus=active` the message is spoken, then the
  room is deleted (BYE) or the caller is transferred to the overflow number (SIP REFER).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from livekit import api, rtc
from livekit.agents import AutoSubscribe, JobContext

from voicefleet_runtime import agents_internals
from voicefleet_runtime.admission import OVERFLOW_ATTRIBUTE, OVERFLOW_HEADER, OverflowOptions
from voicefleet_runtime.config import RuntimeConfig
from voicefleet_runtime.pipeline import build_tts, message_tts
from voicefleet_runtime.telephony import CallControls, PhoneCall

logger = logging.getLogger("voicefleet.runtime.overflow")

SIP_END_CALL_RPC = "lk.sip.EndCall"
"""livekit-sip's participant RPC (pkg/sip/rpc.go): ends the call; before the answer that is a
final 486 Busy Here carrying the request's headers."""
SIP_CALL_STATUS_ATTRIBUTE = "sip.callStatus"
AGENT_NAME_ATTRIBUTE = "lk.agent_name"
"""Set by livekit-server on every agent it dispatches (pkg/agent/worker.go); set here too."""
CALLER_WAIT_SECONDS = 30.0
"""A dispatch may come before its caller joins; an overflow job waits this long for them."""
ANSWER_WAIT_SECONDS = 10.0
"""How long a phone call may take from our track being published to being answered."""

SIP_REASON_TEXT = {486: "Busy Here", 480: "Temporarily Unavailable", 503: "Service Unavailable"}


WARM_IMPORTS = ("openai.resources.audio", "anyio._backends._asyncio", "anyio.streams.stapled")
"""Modules the TTS clients import on their first request (measured: ~0.3 s each on a busy
node), imported in prewarm instead."""


def prewarm_tts(config: RuntimeConfig) -> Any:
    """The pipeline's TTS, built ahead of the job (creating its HTTP client's SSL context takes
    ~0.25 s), with the lazy imports of its first request done."""
    for module in WARM_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    return build_tts(message_tts(config.pipeline))


def reject_headers(options: OverflowOptions, reason: str) -> dict[str, str]:
    """SIP headers on the final response of a rejected overflow call."""
    headers = {OVERFLOW_HEADER: reason}
    status = options.sip.status
    if status != 486:
        # livekit-sip 1.8.0 always answers 486 here; the chosen status travels as the cause.
        headers["Reason"] = f'SIP ;cause={status} ;text="{SIP_REASON_TEXT[status]}"'
    return headers


class Message:
    """The overflow message, synthesised while the job joins the room: the frames are queued
    as the TTS yields them and played once the track is published (and, for a phone call,
    answered), so the synthesis does not wait for the join nor the join for the synthesis."""

    def __init__(self, tts: Any, text: str) -> None:
        self.tts = tts
        self.text = text
        self.sample_rate: int = tts.sample_rate
        self.num_channels: int = tts.num_channels
        self._frames: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._synthesise(), name="overflow-message-tts")

    async def _synthesise(self) -> None:
        try:
            async with self.tts.synthesize(self.text) as stream:
                async for audio in stream:
                    await self._frames.put(audio.frame)
        finally:
            await self._frames.put(None)

    async def play(self, source: rtc.AudioSource) -> float:
        """Play the whole message on `source`; returns the wall time of its first frame."""
        first_frame_at = 0.0
        while (frame := await self._frames.get()) is not None:
            if not first_frame_at:
                first_frame_at = time.time()
            await source.capture_frame(frame)
        await self._task  # re-raises a synthesis failure
        await source.wait_for_playout()
        return first_frame_at

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def wait_answered(participant: rtc.RemoteParticipant, timeout_s: float) -> bool:
    """Until livekit-sip marks the caller's leg active (answered and media bridged)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if participant.attributes.get(SIP_CALL_STATUS_ATTRIBUTE) == "active":
            return True
        await asyncio.sleep(0.05)
    return False


async def give_overflow_treatment(
    ctx: JobContext, config: RuntimeConfig, reason: str, *, tts: Any | None = None
) -> None:
    """`tts`: the pipeline's TTS built in the process's prewarm (else built here)."""
    options = config.overflow
    received_at = agents_internals.dispatch_received_at(ctx)
    tts = tts if tts is not None else build_tts(message_tts(config.pipeline))
    # A phone call that is to be rejected needs no message: do not synthesise (or bill) it.
    message = Message(tts, options.message) if options.sip.action != "reject" else None
    try:
        await _treat(ctx, options, reason, tts, message, received_at)
    finally:
        if message is not None:
            await message.aclose()


async def _treat(
    ctx: JobContext,
    options: OverflowOptions,
    reason: str,
    tts: Any,
    message: Message | None,
    received_at: float,
) -> None:
    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
    try:
        participant = await asyncio.wait_for(ctx.wait_for_participant(), CALLER_WAIT_SECONDS)
    except TimeoutError:
        logger.info("overflow (%s) in room %s: no caller came", reason, ctx.room.name)
        ctx.shutdown(reason="overflow: no caller")
        return
    phone = PhoneCall.from_participant(ctx.room.name, participant)
    controls = CallControls(ctx.room.name, phone, options.sip.transfer_to)
    if phone is not None and options.sip.action == "reject":
        headers = reject_headers(options, reason)
        try:
            await ctx.room.local_participant.perform_rpc(
                destination_identity=participant.identity,
                method=SIP_END_CALL_RPC,
                payload=json.dumps({"headers": headers}),
            )
        except rtc.RpcError as error:
            # Ending the room ends a ringing call with 486 too, without our headers.
            logger.warning("overflow: %s failed (%s); deleting the room", SIP_END_CALL_RPC, error)
            await controls.hang_up()
        logger.info(
            "overflow (%s): rejected the phone call in room %s (SIP 486%s) %.2fs after the offer",
            reason,
            ctx.room.name,
            "" if options.sip.status == 486 else f", cause {options.sip.status}",
            time.time() - received_at if received_at else -1.0,
        )
        ctx.shutdown(reason=f"overflow: rejected ({reason})")
        return

    if message is None:  # a WebRTC caller of an agent whose phone callers are rejected
        message = Message(tts, options.message)
    source = rtc.AudioSource(message.sample_rate, message.num_channels)
    track = rtc.LocalAudioTrack.create_audio_track("overflow-message", source)
    await ctx.room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    )
    if phone is not None and not await wait_answered(participant, ANSWER_WAIT_SECONDS):
        logger.warning("overflow: the phone call in room %s was not answered", ctx.room.name)
    first_frame_at = await message.play(source)
    if phone is not None and options.sip.action == "transfer":
        await controls.transfer(f"overflow: {reason}")
    elif phone is not None:
        await controls.hang_up()
    logger.info(
        "overflow (%s): told the caller in room %s (%s); message audio %.2fs after the offer",
        reason,
        ctx.room.name,
        "phone, " + options.sip.action if phone is not None else "webrtc",
        first_frame_at - received_at if received_at and first_frame_at else -1.0,
    )
    ctx.shutdown(reason=f"overflow: message ({reason})")


# --- the main process's overflow desk ---------------------------------------------------------


def overflow_token(
    config: RuntimeConfig, api_key: str, api_secret: str, job_id: str, room: str, reason: str
) -> str:
    """An agent participant's token for the overflow treatment of one job: the same identity
    and attributes an accepted job would get (livekit-server's BuildAgentToken)."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_identity(f"overflow-{job_id}")
        .with_name(config.name)
        .with_kind("agent")
        .with_attributes({OVERFLOW_ATTRIBUTE: reason, AGENT_NAME_ATTRIBUTE: config.dispatch_name})
        .with_grants(
            api.VideoGrants(
                room_join=True,
                room=room,
                agent=True,
                can_publish=True,
                can_subscribe=True,
                can_publish_data=True,
                can_update_own_metadata=True,
            )
        )
        .to_jwt()
    )


@dataclass(frozen=True)
class Treated:
    """One finished treatment, for the call record."""

    job_id: str
    room: str
    reason: str
    how: str
    received_at: float
    caller: rtc.RemoteParticipant | None


class OverflowDesk:
    """Gives the overflow treatment from the worker's main process, without a job process.

    The offer is answered with terminate (livekit-server ends the job as done, offers it to no
    one else, `pkg/agent/worker.go` AssignJob) and the desk joins the room itself with an agent
    token it mints, carrying the same `voicefleet.overflow` attribute. The message is
    synthesised once per worker and replayed, so a caller beyond capacity costs no process
    start, no TTS request and no model: the room join and the playout. The job-process path
    (`give_overflow_treatment`) remains for a worker that cannot mint tokens.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        url: str,
        api_key: str,
        api_secret: str,
        on_done: Callable[[Treated], None] | None = None,
    ) -> None:
        self.config = config
        self.url = url
        self.api_key = api_key
        self.api_secret = api_secret
        self.on_done = on_done
        self.running: set[asyncio.Task[None]] = set()
        self._frames: list[rtc.AudioFrame] | None = None
        self._format = (0, 0)
        self._synthesis: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(
        cls, config: RuntimeConfig, on_done: Callable[[Treated], None] | None = None
    ) -> OverflowDesk | None:
        """A desk if the worker has LiveKit credentials to mint tokens with, else None."""
        url = os.environ.get("LIVEKIT_URL", "")
        key = os.environ.get("LIVEKIT_API_KEY", "")
        secret = os.environ.get("LIVEKIT_API_SECRET", "")
        if not (url and key and secret):
            return None
        return cls(config, url=url, api_key=key, api_secret=secret, on_done=on_done)

    def warm(self) -> None:
        """Synthesise the message now (in the background) rather than for the first caller."""
        if self._synthesis is None:
            self._synthesis = asyncio.create_task(self._synthesise(), name="overflow-message")

    async def _synthesise(self) -> None:
        frames: list[rtc.AudioFrame] = []
        # Outside a job livekit-agents has no HTTP session to lend the plugins that need one.
        async with aiohttp.ClientSession() as http_session:
            tts = build_tts(message_tts(self.config.pipeline), http_session=http_session)
            try:
                async with tts.synthesize(self.config.overflow.message) as stream:
                    async for audio in stream:
                        frames.append(audio.frame)
            finally:
                await tts.aclose()
        self._format = (tts.sample_rate, tts.num_channels)
        self._frames = frames
        logger.info(
            "overflow message synthesised once: %.1fs of audio",
            sum(frame.duration for frame in frames),
        )

    async def message(self) -> tuple[list[rtc.AudioFrame], tuple[int, int]]:
        for _attempt in range(2):
            self.warm()
            assert self._synthesis is not None
            try:
                await asyncio.shield(self._synthesis)
            except Exception:
                logger.exception("overflow message synthesis failed; trying again")
                self._synthesis = None
                continue
            if self._frames is not None:
                return self._frames, self._format
        raise RuntimeError("the overflow message could not be synthesised")

    def start(self, job_id: str, room: str, reason: str, received_at: float) -> None:
        task = asyncio.create_task(
            self._treat(job_id, room, reason, received_at), name=f"overflow-{job_id}"
        )
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _treat(self, job_id: str, room_name: str, reason: str, received_at: float) -> None:
        options = self.config.overflow
        room = rtc.Room()
        token = overflow_token(
            self.config, self.api_key, self.api_secret, job_id, room_name, reason
        )
        how, caller = "no caller", None
        try:
            await room.connect(self.url, token, rtc.RoomOptions(auto_subscribe=False))
            caller = await first_caller(room, CALLER_WAIT_SECONDS)
            if caller is None:
                logger.info("overflow (%s) in room %s: no caller came", reason, room_name)
                return
            phone = PhoneCall.from_participant(room_name, caller)
            controls = CallControls(room_name, phone, options.sip.transfer_to)
            if phone is not None and options.sip.action == "reject":
                await reject_call(room, caller, options, reason, controls)
                how = "rejected"
                logger.info(
                    "overflow (%s): rejected the phone call in room %s (SIP 486%s) %.2fs after "
                    "the offer",
                    reason,
                    room_name,
                    "" if options.sip.status == 486 else f", cause {options.sip.status}",
                    time.time() - received_at,
                )
                return
            frames, (rate, channels) = await self.message()
            source = rtc.AudioSource(rate, channels)
            track = rtc.LocalAudioTrack.create_audio_track("overflow-message", source)
            await room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
            if phone is not None and not await wait_answered(caller, ANSWER_WAIT_SECONDS):
                logger.warning("overflow: the phone call in room %s was not answered", room_name)
            first_frame_at = time.time()
            await play_frames(source, frames)
            await source.aclose()
            if phone is not None and options.sip.action == "transfer":
                await controls.transfer(f"overflow: {reason}")
                how = "transferred"
            elif phone is not None:
                await controls.hang_up()
                how = "message, hung up"
            else:
                how = "message"
            logger.info(
                "overflow (%s): told the caller in room %s (%s); message audio %.2fs after the "
                "offer",
                reason,
                room_name,
                "phone, " + options.sip.action if phone is not None else "webrtc",
                first_frame_at - received_at,
            )
        except Exception:
            logger.exception("overflow treatment in room %s failed", room_name)
            how = "failed"
        finally:
            with contextlib.suppress(Exception):
                await room.disconnect()
            if self.on_done is not None:
                self.on_done(Treated(job_id, room_name, reason, how, received_at, caller))

    async def aclose(self) -> None:
        """Let running treatments finish (they are a few seconds)."""
        if self.running:
            await asyncio.wait(set(self.running), timeout=ANSWER_WAIT_SECONDS + 30)


async def play_frames(source: rtc.AudioSource, frames: list[rtc.AudioFrame]) -> None:
    """Play a synthesised message on `source`, to its end."""
    for frame in frames:
        await source.capture_frame(frame)
    await source.wait_for_playout()


def callers(room: rtc.Room) -> list[rtc.RemoteParticipant]:
    """The room's participants that are not agents."""
    return [
        participant
        for participant in room.remote_participants.values()
        if participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    ]


async def first_caller(room: rtc.Room, timeout_s: float) -> rtc.RemoteParticipant | None:
    """The first participant in the room that is not an agent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if present := callers(room):
            return present[0]
        await asyncio.sleep(0.02)
    return None


async def reject_call(
    room: rtc.Room,
    caller: rtc.RemoteParticipant,
    options: OverflowOptions,
    reason: str,
    controls: CallControls,
) -> None:
    """End a ringing phone call with livekit-sip's `lk.sip.EndCall` (486 + our headers)."""
    try:
        await room.local_participant.perform_rpc(
            destination_identity=caller.identity,
            method=SIP_END_CALL_RPC,
            payload=json.dumps({"headers": reject_headers(options, reason)}),
        )
    except rtc.RpcError as error:
        # Ending the room ends a ringing call with 486 too, without our headers.
        logger.warning("overflow: %s failed (%s); deleting the room", SIP_END_CALL_RPC, error)
        await controls.hang_up()
