"""The test participant against a real livekit-server: two callers in one room hear each other,
with the timings and loudness the runtime tests rely on."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from livekit import api
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_testkit.participant import ParticipantError, TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer

pytestmark = pytest.mark.integration


def _room() -> str:
    return f"participant-test-{uuid.uuid4().hex[:8]}"


def _token(livekit: LiveKitEndpoint, room: str, identity: str) -> str:
    return participant_token(livekit.api_key, livekit.api_secret, room, identity)


async def test_two_participants_hear_each_other(livekit: LiveKitEndpoint) -> None:
    room = _room()
    async with (
        TestParticipant(livekit.url, _token(livekit, room, "alice")) as alice,
        TestParticipant(livekit.url, _token(livekit, room, "bob")) as bob,
    ):
        await alice.wait_for_participant(identity="bob", timeout_s=10)
        await bob.wait_for_participant(identity="alice", timeout_s=10)
        # Both microphones send silence before anyone speaks; wait until it flows both ways.
        assert await bob.wait_for_media("alice") > 0
        assert await alice.wait_for_media("bob") > 0
        await asyncio.sleep(0.5)
        assert any(f.identity == "alice" for f in bob.frames), "bob received no frames at all"
        assert bob.speech_segments("alice") == [], "silence was taken for speech"

        question = await alice.say("Hello Bob, what are your opening hours?")
        assert question.ended_at - question.started_at == pytest.approx(question.duration, abs=0.05)
        heard_at = await bob.wait_for_audio("alice", after=question.started_at - 0.2, timeout_s=10)
        segments = await bob.wait_for_speech_end("alice", after=question.started_at - 0.2)

        # Loopback delivery: the first sound arrives well within a second of being sent.
        assert 0 <= heard_at - question.started_at < 1.0, heard_at - question.started_at
        spoken = sum(s.duration for s in segments)
        # espeak-ng pads a little silence around speech; the rest must arrive.
        assert question.duration - 0.6 < spoken <= question.duration + 0.2, (spoken, segments)
        assert all(s.rms > 0.02 for s in segments), segments

        answer = await bob.say("We are open from nine to five.")
        reply_at = await alice.wait_for_audio("bob", after=answer.started_at - 0.2, timeout_s=10)
        assert 0 <= reply_at - answer.started_at < 1.0
        await alice.wait_for_speech_end("bob", after=answer.started_at - 0.2)
        assert alice.received_audio("bob", after=answer.started_at - 0.2).rms > 0.01
        first = alice.time_to_first_audio("bob")
        assert alice.joined_at is not None
        assert first is not None and first == pytest.approx(reply_at - alice.joined_at, abs=0.01)

        async with livekit.api() as lkapi:
            listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
        tracks = {p.identity: [t.source for t in p.tracks] for p in listed.participants}
        assert tracks == {
            "alice": [api.TrackSource.MICROPHONE],
            "bob": [api.TrackSource.MICROPHONE],
        }


async def test_hold_keeps_the_call_until_told_to_leave(livekit: LiveKitEndpoint) -> None:
    room = _room()
    async with TestParticipant(livekit.url, _token(livekit, room, "holder")) as holder:
        leave = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, leave.set)
        started = time.monotonic()
        await holder.hold(until=leave, seconds=10)
        assert 0.4 < time.monotonic() - started < 2.0
        async with livekit.api() as lkapi:
            listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
        assert [p.identity for p in listed.participants] == ["holder"]
    assert holder.left_at is not None


async def test_joining_with_a_foreign_secret_fails_loudly(livekit: LiveKitEndpoint) -> None:
    token = participant_token(livekit.api_key, "x" * 40, _room(), "intruder")
    with pytest.raises(ParticipantError, match="could not join"):
        async with TestParticipant(livekit.url, token):
            pass


def test_token_carries_the_agent_dispatch(livekit: LiveKitEndpoint) -> None:
    token = participant_token(
        livekit.api_key,
        livekit.api_secret,
        "call-1",
        "caller",
        dispatch_agent="acme-support",
        dispatch_metadata='{"case": 7}',
    )
    claims = api.TokenVerifier(livekit.api_key, livekit.api_secret).verify(token)
    assert claims.identity == "caller"
    assert claims.video is not None and claims.video.room == "call-1" and claims.video.room_join
    assert claims.room_config is not None
    (dispatch,) = claims.room_config.agents
    assert (dispatch.agent_name, dispatch.metadata) == ("acme-support", '{"case": 7}')


async def test_transcriptions_published_in_the_room_are_collected(
    livekit: LiveKitEndpoint,
) -> None:
    room = _room()
    async with (
        TestParticipant(livekit.url, _token(livekit, room, "caller")) as caller,
        TestParticipant(livekit.url, _token(livekit, room, "agent")) as agent,
    ):
        await agent.wait_for_participant(identity="caller", timeout_s=10)
        await caller.wait_for_media("agent")  # the caller's transport is up
        publisher = agent.room.local_participant
        # As livekit-agents publishes them: deltas in one stream, final flag on close...
        writer = await publisher.stream_text(
            topic="lk.transcription",
            attributes={"lk.segment_id": "SG_1", "lk.transcription_final": "false"},
        )
        await writer.write("Hello, thanks ")
        await writer.write("for calling.")
        await writer.aclose(attributes={"lk.transcription_final": "true"})
        # ...and JSON TimedString lines for what its STT heard on the caller's track.
        (microphone,) = caller.room.local_participant.track_publications
        heard = await publisher.stream_text(
            topic="lk.transcription",
            attributes={
                "lk.segment_id": "SG_2",
                "lk.transcription_final": "true",
                "lk.transcribed_track_id": microphone,
            },
        )
        await heard.write('{"text": "What are your opening hours?", "start_time": 0.1}\n')
        await heard.aclose()

        greeting = await caller.wait_for_transcript("thanks for calling", timeout_s=10)
        question = await caller.wait_for_transcript("opening hours", timeout_s=10)

    assert (greeting.speaker, greeting.final) == ("agent", True)
    assert greeting.text == "Hello, thanks for calling."
    assert question.speaker == "caller" and question.text == "What are your opening hours?"
    assert caller.said("agent") == ["Hello, thanks for calling."]
    assert caller.said() == ["Hello, thanks for calling.", "What are your opening hours?"]


async def test_an_agent_session_on_the_provider_servers_answers_the_caller(
    livekit: LiveKitEndpoint, providers: ProviderServer
) -> None:
    """The contract the runtime tests build on: a livekit-agents AgentSession whose plugins
    point at the provider servers greets the participant, hears its question through STT,
    and answers with the scripted LLM reply, all as real audio through livekit-server."""
    from livekit import rtc
    from livekit.agents import Agent, AgentSession
    from livekit.plugins import openai as lk_openai
    from livekit.plugins import silero

    class Receptionist(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="You are a receptionist.")

        async def on_enter(self) -> None:
            self.session.say("Hello, thanks for calling.")

    providers.script_transcripts("What are your opening hours?")
    # A standing rule, not a one-off: preemptive generation may ask more than once a turn.
    providers.script_llm(
        LLMReply("We are open from nine to five.", match="opening hours", repeat=True)
    )
    room = _room()
    agent_room = rtc.Room()
    agent_token = (
        api.AccessToken(livekit.api_key, livekit.api_secret)
        .with_identity("agent-under-test")
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room, agent=True))
        .to_jwt()
    )
    session: AgentSession = AgentSession(
        stt=lk_openai.STT(base_url=providers.base_url, api_key="test-key"),
        llm=lk_openai.LLM(base_url=providers.base_url, api_key="test-key", model="gpt-4o-mini"),
        tts=lk_openai.TTS(base_url=providers.base_url, api_key="test-key"),
        vad=silero.VAD.load(),
    )
    async with TestParticipant(livekit.url, _token(livekit, room, "caller")) as caller:
        await agent_room.connect(livekit.url, agent_token)
        try:
            started = time.monotonic()
            await session.start(Receptionist(), room=agent_room)
            greeting_at = await caller.wait_for_audio("agent-under-test", after=started)
            await caller.wait_for_speech_end("agent-under-test", after=started, quiet_s=0.8)

            question = await caller.say("What are your opening hours?")
            reply_at = await caller.wait_for_audio("agent-under-test", after=question.ended_at)
            await caller.wait_for_speech_end("agent-under-test", after=reply_at, quiet_s=0.8)
            await caller.wait_for_transcript("nine to five", speaker="agent-under-test")
        finally:
            await session.aclose()
            await agent_room.disconnect()

    # Loose bounds: the agent runs in this process and its VAD is slow on a busy machine;
    # latency targets belong to the runtime tests, which run agents in their own processes.
    assert greeting_at - started < 20.0
    assert reply_at - question.ended_at < 20.0
    # The question reached STT as most of the phrase (the agent's VAD may, on a loaded machine,
    # cut a turn in two; what follows a cut is not this test's concern).
    heard = providers.requests("stt")[0]
    assert heard["transcript"] == "What are your opening hours?" and not heard["silent"]
    assert heard["audio_seconds"] > 0.5 * question.duration
    answered = [r for r in providers.requests("chat") if r["reply"]["scripted"]]
    assert answered, "the scripted reply was never asked for"
    assert "What are your opening hours?" in answered[0]["body"]["messages"][-1]["content"]
    spoken = [r["text"] for r in providers.requests("tts")]
    assert spoken[0] == "Hello, thanks for calling."
    assert "We are open from nine to five." in spoken
    assert caller.said("agent-under-test")[0] == "Hello, thanks for calling."
    assert caller.said("caller")[0].startswith("What are your opening hours?")
