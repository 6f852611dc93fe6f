"""The test participant against a real livekit-server: two callers in one room hear each other,
with the timings and loudness the runtime tests rely on."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from livekit import api

from e2e.infra.livekit import LiveKitEndpoint
from e2e.participant import ParticipantError, TestParticipant, participant_token

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
        # Both microphones send silence before anyone speaks.
        await asyncio.sleep(1.0)
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
