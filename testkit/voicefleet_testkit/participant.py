"""A test caller for LiveKit rooms, built on the livekit rtc SDK.

It joins a room, publishes a microphone track that carries silence until it is told to say
something (espeak-ng speech, or any `PcmAudio`), records every remote audio frame with its
arrival time, and answers the questions tests and the demo ask: when did the agent first make
a sound, what did it say in which stretches, how long from the end of my question to its reply.

    token = participant_token(url_key, secret, room="call-1", dispatch_agent="acme-support")
    async with TestParticipant(livekit.url, token) as caller:
        greeting_at = await caller.wait_for_audio(timeout_s=30)
        phrase = await caller.say("What are your opening hours?")
        reply_at = await caller.wait_for_audio(after=phrase.ended_at)
        print("turn latency", reply_at - phrase.ended_at)

All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from livekit import api, rtc

from voicefleet_testkit.providers.audio import SILENCE_RMS, PcmAudio, rms, synthesize

log = logging.getLogger(__name__)

SAMPLE_RATE = 48000
FRAME_MS = 20  # 50 frames a second each way keeps several callers cheap on 2 cores
# How far the microphone pump runs ahead of real time (the native source buffers it), so a
# busy event loop (an agent in the same process, a loaded CI box) does not cut gaps into speech
# that the agent's VAD would take for the end of a turn.
MIC_LEAD_S = 0.3
# A stretch counts as speech only when this long, so a click or a codec artefact does not.
MIN_SPEECH_S = 0.06
# livekit-agents publishes transcriptions as text streams on this topic, with these attributes.
TRANSCRIPTION_TOPIC = "lk.transcription"
SEGMENT_ID_ATTRIBUTE = "lk.segment_id"
FINAL_ATTRIBUTE = "lk.transcription_final"
TRACK_ID_ATTRIBUTE = "lk.transcribed_track_id"


class ParticipantError(RuntimeError):
    """The caller could not join, or what a test waited for did not happen in time."""


def participant_token(
    api_key: str,
    api_secret: str,
    room: str,
    identity: str = "caller",
    *,
    name: str | None = None,
    dispatch_agent: str | None = None,
    dispatch_metadata: str = "",
    attributes: dict[str, str] | None = None,
    ttl: timedelta = timedelta(hours=1),
) -> str:
    """A join token for `room`; with `dispatch_agent`, joining also dispatches that agent
    (LiveKit's token-based explicit dispatch). `attributes` are the participant's attributes,
    e.g. the sip.* ones livekit-sip gives a phone caller."""
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_name(name or identity)
        .with_ttl(ttl)
        .with_grants(api.VideoGrants(room_join=True, room=room))
    )
    if attributes:
        token = token.with_attributes(attributes)
    if dispatch_agent:
        token = token.with_room_config(
            api.RoomConfiguration(
                agents=[
                    api.RoomAgentDispatch(agent_name=dispatch_agent, metadata=dispatch_metadata)
                ]
            )
        )
    return token.to_jwt()


@dataclass(frozen=True)
class ReceivedFrame:
    at: float  # arrival, time.monotonic()
    identity: str
    samples: npt.NDArray[np.int16]
    sample_rate: int
    rms: float

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class SpeechSegment:
    """A stretch of non-silent audio from one participant (arrival times)."""

    identity: str
    start: float
    end: float
    rms: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class TranscriptSegment:
    """A transcription the agent published on `lk.transcription`: its own speech, or what its
    STT heard from a caller (`speaker` is whose speech it is)."""

    at: float  # when the stream opened: segments sort in the order they were sent
    speaker: str
    segment_id: str
    text: str
    final: bool


@dataclass
class SpokenPhrase:
    """Something the caller said; times are when its audio went into the track."""

    text: str
    duration: float
    started_at: float = 0.0
    ended_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class TestParticipant:
    """A caller in a LiveKit room. Use as `async with TestParticipant(url, token) as caller:`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, url: str, token: str, *, silence_rms: float = SILENCE_RMS, voice: str = "en-us"
    ) -> None:
        self.url = url
        self._token = token
        self.silence_rms = silence_rms
        self.voice = voice
        self.room = rtc.Room()
        self.frames: list[ReceivedFrame] = []
        self.phrases: list[SpokenPhrase] = []
        self.transcripts: list[TranscriptSegment] = []
        self.joined_at: float | None = None
        self.left_at: float | None = None
        self._source: rtc.AudioSource | None = None
        self._to_say: asyncio.Queue[tuple[SpokenPhrase, PcmAudio]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recorded_tracks: set[str] = set()
        self._new_frame = asyncio.Condition()
        self._disconnected = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TestParticipant:
        await self.join()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leave()

    @property
    def identity(self) -> str:
        return self.room.local_participant.identity

    async def join(self, *, timeout_s: float = 20.0) -> None:
        """Connect, publish the microphone and start recording remote audio."""
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.register_text_stream_handler(TRANSCRIPTION_TOPIC, self._on_transcription)
        self.room.on("disconnected", lambda *_: self._disconnected.set())
        try:
            async with asyncio.timeout(timeout_s):
                await self.room.connect(self.url, self._token, rtc.RoomOptions(auto_subscribe=True))
        except (TimeoutError, rtc.ConnectError) as error:
            raise ParticipantError(
                f"could not join the room at {self.url} within {timeout_s}s: {error!r}; is "
                "livekit-server running (make livekit-up) and the token's key/secret its own?"
            ) from error
        self.joined_at = time.monotonic()
        self._source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=int(MIC_LEAD_S * 2000))
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self._source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(track, options)
        self._spawn(self._pump_microphone())
        # Tracks already subscribed before the handler ran (agent joined first).
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.kind == rtc.TrackKind.KIND_AUDIO:
                    self._on_track_subscribed(publication.track, publication, participant)

    async def leave(self) -> None:
        if self.left_at is not None:
            return
        self.left_at = time.monotonic()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.room.disconnect()
        if self._source is not None:
            await self._source.aclose()

    async def hold(
        self, *, seconds: float | None = None, until: asyncio.Event | None = None
    ) -> None:
        """Stay in the call (microphone silent unless told to speak) for `seconds`, until
        `until` is set, or until the room disconnects us, whichever comes first."""
        waits = [asyncio.ensure_future(self._disconnected.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(until.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("participant task failed", exc_info=task.exception())

    # --- microphone --------------------------------------------------------------------------

    async def say(
        self, text: str, *, trailing_silence_s: float = 0.0, wait: bool = True
    ) -> SpokenPhrase:
        """Speak `text` (espeak-ng) into the microphone; silence follows on its own.

        With `wait`, returns once the audio has gone out (`ended_at` set)."""
        speech = await synthesize(text, voice=self.voice, sample_rate=SAMPLE_RATE)
        if trailing_silence_s:
            speech = speech + PcmAudio.silence(trailing_silence_s, SAMPLE_RATE)
        return await self.play(speech, label=text, wait=wait)

    async def play(self, audio: PcmAudio, *, label: str = "", wait: bool = True) -> SpokenPhrase:
        """Send `audio` into the microphone after anything already queued."""
        if self._source is None:
            raise ParticipantError("join() the room before speaking")
        phrase = SpokenPhrase(text=label, duration=audio.duration)
        self.phrases.append(phrase)
        await self._to_say.put((phrase, audio.resample(SAMPLE_RATE)))
        if wait:
            await phrase.done.wait()
        return phrase

    async def _pump_microphone(self) -> None:
        # A real microphone never stops sending: the agent's VAD needs the silence after a
        # phrase to decide that the caller finished speaking.
        assert self._source is not None
        samples_per_frame = SAMPLE_RATE * FRAME_MS // 1000
        silence = np.zeros(samples_per_frame, dtype=np.int16)
        # `clock`: when the audio sent so far will have played out.
        clock = time.monotonic()
        while True:
            phrase: SpokenPhrase | None = None
            samples = silence
            if not self._to_say.empty():
                phrase, audio = self._to_say.get_nowait()
                samples = audio.samples
            for offset in range(0, len(samples), samples_per_frame):
                chunk = samples[offset : offset + samples_per_frame]
                if len(chunk) < samples_per_frame:
                    chunk = np.concatenate([chunk, silence[: samples_per_frame - len(chunk)]])
                frame = rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, samples_per_frame)
                clock = max(clock, time.monotonic())
                if phrase is not None and offset == 0:
                    phrase.started_at = clock
                clock += FRAME_MS / 1000
                await self._source.capture_frame(frame)
                if (ahead := clock - time.monotonic()) > MIC_LEAD_S:
                    await asyncio.sleep(ahead - MIC_LEAD_S)
            if phrase is not None:
                phrase.ended_at = clock
                self._spawn(self._mark_done(phrase))

    @staticmethod
    async def _mark_done(phrase: SpokenPhrase) -> None:
        # Set once the phrase has played out, so `ended_at` is in the past when `say` returns.
        await asyncio.sleep(max(0.0, phrase.ended_at - time.monotonic()))
        phrase.done.set()

    # --- receiving ---------------------------------------------------------------------------

    def _on_track_subscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        if track.kind != rtc.TrackKind.KIND_AUDIO or track.sid in self._recorded_tracks:
            return
        self._recorded_tracks.add(track.sid)
        self._spawn(self._record(track, participant.identity))

    def _on_transcription(self, reader: rtc.TextStreamReader, speaker: str) -> None:
        self._spawn(self._read_transcription(reader, speaker, time.monotonic()))

    async def _read_transcription(
        self, reader: rtc.TextStreamReader, speaker: str, opened_at: float
    ) -> None:
        raw = await reader.read_all()
        attributes = reader.info.attributes or {}
        # JSON TimedString lines when the agent sends timed transcripts, else plain text.
        parts = []
        for line in raw.splitlines() or [raw]:
            try:
                decoded = json.loads(line)
                parts.append(decoded["text"] if isinstance(decoded, dict) else line)
            except (json.JSONDecodeError, KeyError):
                parts.append(line)
        segment = TranscriptSegment(
            at=opened_at,
            speaker=self._track_owner(attributes.get(TRACK_ID_ATTRIBUTE)) or speaker,
            segment_id=attributes.get(SEGMENT_ID_ATTRIBUTE, reader.info.stream_id),
            text="".join(parts).strip(),
            final=attributes.get(FINAL_ATTRIBUTE) == "true",
        )
        self.transcripts.append(segment)
        async with self._new_frame:
            self._new_frame.notify_all()

    def _track_owner(self, track_sid: str | None) -> str | None:
        """Identity of whoever published `track_sid` (the speech a transcription is of)."""
        if not track_sid:
            return None
        if track_sid in self.room.local_participant.track_publications:
            return self.identity
        for participant in self.room.remote_participants.values():
            if track_sid in participant.track_publications:
                return participant.identity
        return None

    def said(self, speaker: str | None = None) -> list[str]:
        """What was said, per transcription segment (latest text of each), in order; by
        `speaker` when given. Needs the agent to publish transcriptions (the default)."""
        latest: dict[str, TranscriptSegment] = {}
        for segment in self.transcripts:
            if speaker is None or segment.speaker == speaker:
                latest[segment.segment_id] = segment
        return [s.text for s in sorted(latest.values(), key=lambda s: s.at) if s.text]

    async def wait_for_transcript(
        self, text: str, *, speaker: str | None = None, timeout_s: float = 30.0
    ) -> TranscriptSegment:
        """Wait until a transcription containing `text` (case-insensitive) arrives."""

        def found() -> TranscriptSegment | None:
            for segment in self.transcripts:
                if (speaker is None or segment.speaker == speaker) and (
                    text.lower() in segment.text.lower()
                ):
                    return segment
            return None

        await self._wait_until(
            lambda: found() is not None, timeout_s, f"no transcription containing {text!r}"
        )
        segment = found()
        assert segment is not None
        return segment

    async def _record(self, track: rtc.Track, identity: str) -> None:
        stream = rtc.AudioStream.from_track(
            track=track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=FRAME_MS
        )
        try:
            async for event in stream:
                samples = np.frombuffer(event.frame.data, dtype=np.int16).copy()
                received = ReceivedFrame(
                    at=time.monotonic(),
                    identity=identity,
                    samples=samples,
                    sample_rate=event.frame.sample_rate,
                    rms=rms(samples),
                )
                self.frames.append(received)
                async with self._new_frame:
                    self._new_frame.notify_all()
        finally:
            await stream.aclose()

    def remote_identities(self, *, agents_only: bool = False) -> list[str]:
        return [
            p.identity
            for p in self.room.remote_participants.values()
            if not agents_only or p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]

    async def wait_for_participant(
        self, *, identity: str | None = None, agent: bool = True, timeout_s: float = 30.0
    ) -> rtc.RemoteParticipant:
        """Wait for a remote participant: by identity, else the first agent (or anyone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for participant in self.room.remote_participants.values():
                if identity is not None and participant.identity == identity:
                    return participant
                is_agent = participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                if identity is None and (is_agent or not agent):
                    return participant
            await asyncio.sleep(0.05)
        raise ParticipantError(
            f"no {'participant ' + repr(identity) if identity else 'agent' if agent else 'one'} "
            f"joined within {timeout_s}s; in the room: {self.remote_identities() or 'nobody'}"
        )

    async def wait_for_media(self, identity: str, *, timeout_s: float = 20.0) -> int:
        """Wait until RTP packets of `identity`'s audio actually arrive; returns the count.

        A subscribed track yields frames (silence) even before its transport is up, so only
        the packet counter tells that the path works; speak after this, or speech is lost.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            participant = self.room.remote_participants.get(identity)
            tracks = [
                publication.track
                for publication in (participant.track_publications.values() if participant else [])
                if publication.track is not None and publication.kind == rtc.TrackKind.KIND_AUDIO
            ]
            for track in tracks:
                for stats in await track.get_stats():
                    if stats.WhichOneof("stats") == "inbound_rtp":
                        received = int(stats.inbound_rtp.received.packets_received)
                        if received > 0:
                            return received
            if time.monotonic() > deadline:
                raise ParticipantError(
                    f"no audio packets from {identity!r} within {timeout_s}s "
                    f"({len(tracks)} audio track(s) subscribed); {self._summary()}"
                )
            await asyncio.sleep(0.1)

    def _frames(self, identity: str | None, after: float | None) -> list[ReceivedFrame]:
        return [
            f
            for f in self.frames
            if (identity is None or f.identity == identity) and (after is None or f.at >= after)
        ]

    def speech_segments(
        self, identity: str | None = None, *, after: float | None = None, max_gap_s: float = 0.3
    ) -> list[SpeechSegment]:
        """Non-silent stretches (pauses shorter than `max_gap_s` do not split one), per
        participant, in arrival order; stretches shorter than MIN_SPEECH_S are dropped."""
        segments: list[SpeechSegment] = []
        open_segments: dict[str, tuple[float, float, list[float]]] = {}

        def close(who: str) -> None:
            start, end, levels = open_segments.pop(who)
            if end - start >= MIN_SPEECH_S:
                level = float(np.sqrt(np.mean(np.square(levels))))
                segments.append(SpeechSegment(who, start, end, level))

        for frame in self._frames(identity, after):
            if frame.rms < self.silence_rms:
                continue
            begin = frame.at - frame.duration
            current = open_segments.get(frame.identity)
            if current is not None and begin - current[1] > max_gap_s:
                close(frame.identity)
                current = None
            if current is None:
                open_segments[frame.identity] = (begin, frame.at, [frame.rms])
            else:
                current[2].append(frame.rms)
                open_segments[frame.identity] = (current[0], frame.at, current[2])
        for who in list(open_segments):
            close(who)
        return sorted(segments, key=lambda s: s.start)

    def first_audio_at(
        self, identity: str | None = None, *, after: float | None = None
    ) -> float | None:
        """Arrival time of the first speech (not silence) after `after`, or None."""
        run_start: float | None = None
        for frame in self._frames(identity, after):
            if frame.rms < self.silence_rms:
                run_start = None
                continue
            begin = frame.at - frame.duration
            run_start = begin if run_start is None else run_start
            if frame.at - run_start >= MIN_SPEECH_S:
                return run_start
        return None

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        async with self._new_frame:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ParticipantError(f"{what} within {timeout_s}s; {self._summary()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new_frame.wait(), timeout=min(remaining, 0.25))

    async def wait_for_audio(
        self, identity: str | None = None, *, after: float | None = None, timeout_s: float = 30.0
    ) -> float:
        """Wait for non-silent audio (from `identity`, else anyone) that starts after `after`;
        returns its arrival time."""
        await self._wait_until(
            lambda: self.first_audio_at(identity, after=after) is not None,
            timeout_s,
            f"no audio from {identity or 'any participant'} after {self._rel(after)}",
        )
        found = self.first_audio_at(identity, after=after)
        assert found is not None
        return found

    async def wait_for_speech_end(
        self,
        identity: str | None = None,
        *,
        after: float | None = None,
        quiet_s: float = 1.0,
        timeout_s: float = 60.0,
    ) -> list[SpeechSegment]:
        """Wait until someone spoke after `after` and then was quiet for `quiet_s`; returns the
        segments since `after`, so a test can tell how long the reply was."""

        def finished() -> bool:
            segments = self.speech_segments(identity, after=after)
            return bool(segments) and time.monotonic() - segments[-1].end >= quiet_s

        await self._wait_until(
            finished,
            timeout_s,
            f"{identity or 'nobody'} did not speak and stop after {self._rel(after)}",
        )
        return self.speech_segments(identity, after=after)

    def received_audio(
        self, identity: str | None = None, *, after: float | None = None
    ) -> PcmAudio:
        frames = self._frames(identity, after)
        if not frames:
            return PcmAudio.silence(0, SAMPLE_RATE)
        return PcmAudio(np.concatenate([f.samples for f in frames]), SAMPLE_RATE)

    def time_to_first_audio(
        self, identity: str | None = None, *, since: float | None = None
    ) -> float | None:
        """Seconds from `since` (default: when we joined) to the first speech received."""
        start = since if since is not None else self.joined_at
        if start is None:
            return None
        first = self.first_audio_at(identity, after=start)
        return None if first is None else first - start

    def _rel(self, at: float | None) -> str:
        if at is None or self.joined_at is None:
            return "joining"
        return f"t={at - self.joined_at:+.2f}s since joining"

    def _summary(self) -> str:
        by_identity: dict[str, int] = {}
        for frame in self.frames:
            by_identity[frame.identity] = by_identity.get(frame.identity, 0) + 1
        segments = self.speech_segments()
        return (
            f"in the room: {self.remote_identities() or 'nobody'}; frames received: "
            f"{by_identity or 'none'}; speech segments: "
            f"{[(s.identity, round(s.duration, 2)) for s in segments] or 'none'}; "
            f"transcripts: {[(t.speaker, t.text) for t in self.transcripts] or 'none'}"
        )
