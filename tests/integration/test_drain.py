"""A worker told to stop (SIGTERM, as the kubelet does on scale-down or rollout) cuts no call.

A real worker process (`python -m voicefleet_runtime start`) on a real livekit-server, a test
caller holding a call, the local provider servers: after SIGTERM the worker takes no new call,
the held one goes on (the agent still answers), its report still counts it and says draining,
/ready turns 503 at
once (the pod leaves Ready), and the worker exits
by itself only once the caller hangs up, well inside the drain timeout.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest
from livekit import rtc
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_testkit.participant import ParticipantError, TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import running_worker, runtime_config

pytestmark = pytest.mark.integration

DRAIN_TIMEOUT_SECONDS = 120
HOLD_AFTER_SIGTERM_SECONDS = 8.0


def call_token(livekit: LiveKitEndpoint, dispatch_name: str, caller: str) -> str:
    room = f"drain-{uuid.uuid4().hex[:8]}"
    return participant_token(
        livekit.api_key, livekit.api_secret, room, caller, dispatch_agent=dispatch_name
    )


async def test_sigterm_drains_the_held_call_and_takes_no_new_one(
    livekit: LiveKitEndpoint, providers: ProviderServer, tmp_path: Path
) -> None:
    dispatch_name = f"drain-{uuid.uuid4().hex[:6]}"
    config = runtime_config(
        dispatch_name,
        providers.base_url,
        "http://127.0.0.1:9",  # webhooks are not called in this test
        jobsPerWorker=2,
        drainTimeoutSeconds=DRAIN_TIMEOUT_SECONDS,
    )
    providers.script_transcripts("Are you still there?")
    providers.script_llm(LLMReply("Yes, I am still here.", match="still there"))
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        token = call_token(livekit, dispatch_name, "held-caller")
        async with TestParticipant(livekit.url, token) as caller:
            agent = await caller.wait_for_participant(agent=True, timeout_s=30)
            agent_left_at: list[float] = []

            def on_left(participant: rtc.RemoteParticipant) -> None:
                if participant.identity == agent.identity:
                    agent_left_at.append(time.monotonic())

            caller.room.on("participant_disconnected", on_left)
            await caller.wait_for_audio(agent.identity, timeout_s=30)  # the greeting
            assert worker.status()["active_jobs"] == 1
            before = worker.report()
            assert (before.agent_jobs, before.registered, before.draining) == (1, True, False)
            assert worker.readiness()[0] == 200

            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)  # as the kubelet sends it
            sigterm_at = time.monotonic()
            # Not Ready from the moment it drains (the pod leaves its Service's endpoints).
            await wait_until(
                "/ready turning 503 on SIGTERM", lambda: worker.readiness()[0] == 503, 10
            )
            assert "draining" in worker.readiness()[1]

            # A new call finds no worker: the draining one reports itself full.
            new_token = call_token(livekit, dispatch_name, "late-caller")
            async with TestParticipant(livekit.url, new_token) as late:
                with pytest.raises(ParticipantError):
                    await late.wait_for_participant(
                        agent=True, timeout_s=HOLD_AFTER_SIGTERM_SECONDS
                    )

            # The held call goes on: the worker is alive, reports the job, the agent answers.
            assert worker.process.poll() is None, worker.log_tail()
            assert worker.status()["active_jobs"] == 1
            during = worker.report()
            assert (during.agent_jobs, during.draining) == (1, True)
            phrase = await caller.say("Are you still there?")
            reply_at = await caller.wait_for_audio(
                agent.identity, after=phrase.ended_at, timeout_s=30
            )
            assert reply_at > phrase.ended_at
            assert not agent_left_at, "the agent left the held call during the drain"
            assert "draining worker" in worker.log()

        hung_up_at = time.monotonic()
        # The caller hung up: the drain is over and the worker exits by itself.
        exit_code = await asyncio.to_thread(worker.process.wait, DRAIN_TIMEOUT_SECONDS)
        exited_at = time.monotonic()
        assert exit_code == 0, worker.log_tail()
        assert not agent_left_at or agent_left_at[0] >= hung_up_at
        print(
            f"drain: worker held the call {hung_up_at - sigterm_at:.1f}s after SIGTERM and "
            f"exited {exited_at - hung_up_at:.1f}s after the caller hung up"
        )
