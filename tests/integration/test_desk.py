"""The platform desk speaks to callers of a fleet with no worker (issue 12 items 2 and 3): the real
operator (its own process), the real desk (`python -m voicefleet_runtime desk`, its own
process), a real control plane, livekit-server and livekit-sip, sipp and WebRTC callers, and the
real runtime started by test_wake's stand-in kubelet.

- A fleet at zero with spec.overflow.holdMessage: a phone call is answered by the desk at once
  and the caller hears the holding message (no ringing into silence), then the agent's greeting
  once the woken worker took the call; the desk leaves the moment the agent joins.
- A fleet that cannot wake, with sip.action message: the WebRTC caller hears the holding message,
  then the overflow message with the voicefleet.overflow=wake_timeout attribute; the phone caller
  is answered, hears both and is hung up on (livekit-sip's BYE).

Measured (printed, attached to the report): INVITE -> answer and INVITE -> the holding message's
first audio; join -> the desk's first audio for WebRTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator.kube import Kube
from voicefleet_runtime.desk_contract import DESK_ATTRIBUTE
from voicefleet_testkit import sipcall
from voicefleet_testkit.net import free_port
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer
from voicefleet_testkit.waiting import wait_for, wait_until

from tests.integration.test_operator import (
    cluster,  # noqa: F401  (fixture)
    settings_for,
)
from tests.integration.test_overflow import final_response
from tests.integration.test_wake import (
    AGENT,
    GREETING,
    OVERFLOW_ATTRIBUTE,
    WAKE_TIMEOUT_SECONDS,
    _delete_agent_and_stop,
    create_sleeper,
    fresh_number,
    kube,  # noqa: F401  (fixture)
    kubelet,
    namespaces,  # noqa: F401  (fixture)
    operator_log,
    sleeper_spec,
    wait_asleep,
)

pytestmark = pytest.mark.integration

HOLD_MESSAGE = "Thanks for calling. Your agent will be with you in a moment."
OVERFLOW_MESSAGE = "Sorry, nobody can take your call right now. Please call again later."
ANSWER_BOUND_S = 2.0
"""The issue's bound: no caller waits longer than this without an agent or a treatment."""
GAP_S = 0.6
"""Silence that separates two utterances in the caller's audio."""


@contextlib.contextmanager
def running_desk(
    livekit: LiveKitEndpoint, providers: ProviderServer, log: Path
) -> Iterator[tuple[str, Path]]:
    """`python -m voicefleet_runtime desk` on this host, speaking through the provider server's
    OpenAI-compatible TTS; yields (its URL, its log)."""
    port = free_port()
    env = {
        **os.environ,
        "VOICEFLEET_DESK_LIVEKIT_URL": livekit.url,
        "VOICEFLEET_DESK_TTS": json.dumps({"provider": "openai", "baseUrl": providers.base_url}),
        "VOICEFLEET_DESK_PORT": str(port),
        "OPENAI_API_KEY": "sk-desk",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "voicefleet_runtime", "desk"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            return True  # exited: reported below
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for("the desk answering /healthz", up, 60)
        assert process.poll() is None, f"the desk exited:\n{log.read_text()}"
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def voiced_runs(result: sipcall.CallResult) -> list[tuple[float, float]]:
    """(start, end) of each utterance the phone caller heard, relative to the INVITE."""
    assert result.invite_at is not None
    runs: list[list[float]] = []
    for frame in result.capture.pcmu_frames():
        if frame.rms <= sipcall.SILENCE_RMS:
            continue
        at = frame.at - result.invite_at
        if runs and at - runs[-1][1] <= GAP_S:
            runs[-1][1] = at
        else:
            runs.append([at, at])
    return [(start, end) for start, end in runs]


def answered_by_the_desk(result: sipcall.CallResult) -> float:
    """The call was answered (200 OK) within ANSWER_BOUND_S of the INVITE, as only the desk can
    while no worker runs; returns INVITE -> answer."""
    described = result.describe()
    final = final_response(result)
    assert final is not None and final.first_line.startswith("SIP/2.0 200"), described
    assert result.invite_at is not None and result.answered_at is not None
    answered_s = result.answered_at - result.invite_at
    assert answered_s <= ANSWER_BOUND_S, described
    return answered_s


@contextlib.asynccontextmanager
async def operator_with_desk(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    wake_timeout_seconds: float,
) -> AsyncIterator[tuple[OperatorProcess, Path]]:
    """The desk and the operator (pointed at it) on this host; yields (the operator, the desk's
    log). The test's VoiceAgent is deleted and the operator stopped at the end."""
    platform, tenant = namespaces
    with running_desk(livekit, providers, tmp_path / "desk.log") as (desk_url, desk_log):
        settings = settings_for(
            platform,
            (tenant,),
            livekit_url=livekit.url,
            wake_timeout_seconds=wake_timeout_seconds,
            desk_url=desk_url,
        )
        operator = OperatorProcess(settings, cluster.kubeconfig, tmp_path / "operator.log").start()
        try:
            yield operator, desk_log
        finally:
            await _delete_agent_and_stop(cluster, tenant, operator)


def tts_texts(providers: ProviderServer) -> list[str]:
    return [str(request.get("text")) for request in providers.requests("tts")]


async def test_a_caller_hears_the_holding_message_then_the_agent(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],  # noqa: F811
    kube: Kube,  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    _, tenant = namespaces
    number = fresh_number()
    spec = sleeper_spec(providers.base_url, number, free_port(), free_port())
    spec["overflow"] = {"holdMessage": HOLD_MESSAGE}
    providers.reset()
    async with operator_with_desk(
        cluster, livekit, providers, namespaces, tmp_path, WAKE_TIMEOUT_SECONDS
    ) as (operator, desk_log):
        create_sleeper(cluster, tenant, spec)
        async with kubelet(kube, livekit, tmp_path, tenant, start_workers=True) as fake:
            await asyncio.to_thread(wait_asleep, cluster, tenant, operator)
            result = await asyncio.to_thread(
                sipcall.place_call,
                "call.xml",
                number,
                tmp_path / "sip-call",
                talk_seconds=40,  # the greeting comes once a worker started (a minute here)
                answer_timeout=30,
                timeout=WAKE_TIMEOUT_SECONDS + 60,
            )
            described = result.describe()
            # Answered by the desk and told at once, not ringing until a worker starts.
            answered_s = answered_by_the_desk(result)
            hold_audio_s = result.invite_to_first_audio
            assert hold_audio_s is not None, described
            assert hold_audio_s <= ANSWER_BOUND_S + 0.5, described
            runs = voiced_runs(result)
            # The holding message, then (after the worker started) the agent's greeting.
            assert len(runs) >= 2, (runs, described)
            assert len(fake.started) == 1, fake.started
            log = operator_log(operator)
            assert "the desk says the holding message" in log, log[-3000:]
            assert "handed over to the fleet's first worker" in log, log[-3000:]
            await wait_until(
                "the desk leaving as the agent joined",
                lambda: "left (handed_over)" in desk_log.read_text(),
                30,
            )
            texts = tts_texts(providers)
            assert texts.count(HOLD_MESSAGE) == 1, texts  # the desk's, synthesised once
            assert GREETING.split(". ")[0] + "." in texts, texts  # said sentence by sentence
            greeting_s = runs[1][0]  # the first utterance after the holding message
    record_property("desk_invite_to_answer_s", round(answered_s, 2))
    record_property("desk_invite_to_holding_message_s", round(hold_audio_s, 2))
    record_property("desk_invite_to_agent_greeting_s", round(greeting_s, 2))
    print(
        f"desk: INVITE -> answer {answered_s:.2f}s, -> holding message {hold_audio_s:.2f}s, "
        f"-> the agent's greeting {greeting_s:.2f}s (a worker started meanwhile)"
    )


async def test_a_fleet_that_cannot_wake_has_the_desk_say_the_overflow_message(
    cluster: ClusterHandle,  # noqa: F811
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    namespaces: tuple[str, str],  # noqa: F811
    kube: Kube,  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    _, tenant = namespaces
    number = fresh_number()
    spec = sleeper_spec(providers.base_url, number, free_port(), free_port())
    spec["overflow"] = {
        "holdMessage": HOLD_MESSAGE,
        "message": OVERFLOW_MESSAGE,
        "sip": {"action": "message"},
    }
    wake_timeout = 6.0
    providers.reset()
    async with operator_with_desk(
        cluster, livekit, providers, namespaces, tmp_path, wake_timeout
    ) as (operator, desk_log):
        create_sleeper(cluster, tenant, spec)
        async with kubelet(kube, livekit, tmp_path, tenant, start_workers=False):
            await asyncio.to_thread(wait_asleep, cluster, tenant, operator)

            # --- WebRTC: the desk joins and speaks, then the overflow message -------------
            room = f"desk-{secrets.token_hex(4)}"
            token = participant_token(
                livekit.api_key,
                livekit.api_secret,
                room,
                "caller",
                dispatch_agent=f"{tenant}.{AGENT}",
            )
            async with TestParticipant(livekit.url, token) as caller:
                joined_at = time.monotonic()
                desk = await caller.wait_for_participant(agent=True, timeout_s=10)
                assert desk.attributes.get(DESK_ATTRIBUTE) == "holding", desk.attributes
                held_at = await caller.wait_for_audio(desk.identity, timeout_s=10)
                webrtc_hold_s = held_at - joined_at

                def told() -> bool:
                    attributes = caller.room.local_participant.attributes
                    return attributes.get(OVERFLOW_ATTRIBUTE) == "wake_timeout"

                await wait_until("the caller told the fleet cannot wake", told, 60)
                told_at = time.monotonic()
                assert desk.attributes.get(DESK_ATTRIBUTE) == "overflow", desk.attributes
                await caller.wait_for_audio(desk.identity, after=told_at - 0.5, timeout_s=10)
                await wait_until(
                    "the desk gone after the overflow message",
                    lambda: desk.identity not in caller.remote_identities(),
                    60,
                )

            # --- phone: answered by the desk, both messages, then livekit-sip's BYE ------
            result = await asyncio.to_thread(
                sipcall.place_call,
                "call.xml",
                number,
                tmp_path / "sip-call",
                talk_seconds=40,  # longer than the wake timeout and both messages
                answer_timeout=30,
            )
            described = result.describe()
            answered_s = answered_by_the_desk(result)
            assert result.capture.received_requests("BYE"), described  # hung up on
            runs = voiced_runs(result)
            assert len(runs) >= 2, (runs, described)  # the holding, then the overflow message
            assert runs[-1][0] >= wake_timeout - 1.0, (runs, described)
            log = operator_log(operator)
            assert "the desk said spec.overflow.message" in log, log[-3000:]
            assert "left (finished)" in desk_log.read_text()
            texts = tts_texts(providers)
            assert texts.count(HOLD_MESSAGE) == 1 and texts.count(OVERFLOW_MESSAGE) == 1, texts
    record_property("desk_webrtc_join_to_holding_message_s", round(webrtc_hold_s, 2))
    record_property("desk_wake_timeout_invite_to_answer_s", round(answered_s, 2))
    print(
        f"desk, fleet cannot wake ({wake_timeout:g}s): WebRTC join -> holding message "
        f"{webrtc_hold_s:.2f}s; INVITE -> answer {answered_s:.2f}s; overflow message at "
        f"{runs[-1][0]:.2f}s, then BYE"
    )
