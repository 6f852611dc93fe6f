"""Admission and overflow against a real livekit-server: a worker that holds 2 calls gets 5
dispatches at once; 2 callers get the agent, 3 hear the overflow message (and see why in the
agent's participant attribute), each counted with its reason; when a call ends, the next caller
gets the agent again; the same with 5 phone calls through livekit-sip (sipp), where the
callers beyond capacity get the configured SIP rejection. The dispatch -> overflow message and
INVITE -> final response times are printed and attached to the report (the issue's bound: the
caller learns within 2 s of the decision)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from livekit import rtc
from voicefleet_localdev.livekit import LiveKitEndpoint, SipEndpoint
from voicefleet_operator import admission as fleet_admission
from voicefleet_operator import autoscaler
from voicefleet_operator.api import parse_spec
from voicefleet_operator.render import VoiceAgentRef
from voicefleet_operator.scaling import WorkerPod, read_fleet
from voicefleet_operator.telephony import RINGING_TIMEOUT_SECONDS, TelephonyProvisioner
from voicefleet_runtime.admission import (
    OVER_BUDGET_LOAD,
    OVERFLOW_ATTRIBUTE,
    OverflowReason,
    WorkerReport,
)
from voicefleet_testkit import sipcall
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import (
    GREETING,
    RuntimeWorker,
    dispatch_at_once,
    running_worker,
    runtime_config,
    sample_values,
)
from tests.integration.test_telephony import make_target

pytestmark = pytest.mark.integration

OVERFLOW_MESSAGE = "All of our agents are busy right now. Please call again later."


def overflow_config(dispatch_name: str, provider_url: str) -> dict[str, object]:
    """A worker that holds 2 calls (jobsPerWorker 2, loadThreshold 1.0)."""
    config = runtime_config(
        dispatch_name,
        provider_url,
        "http://127.0.0.1:9",  # webhooks are not called in this test
        jobsPerWorker=2,
        loadThreshold=1.0,
        idleProcesses=2,
    )
    config["overflow"] = {"message": OVERFLOW_MESSAGE}
    return config


async def push_cap(worker: RuntimeWorker, cap: int | None) -> WorkerReport:
    """What an autoscaler evaluation does for a fleet of this one worker and a VoiceAgent cap
    of `cap`: read its report, compute the budgets, push the changes; returns the worker's
    report afterwards."""
    pod = WorkerPod(name="worker-0", ip="127.0.0.1", ready=True, terminating=False)
    port = worker.metrics_port
    async with aiohttp.ClientSession() as session:
        reports = (await read_fleet([pod], port, request_seconds=5.0, session=session)).reports()
        assert set(reports) == {"worker-0"}, "the worker did not report"
        limit = fleet_admission.fleet_cap(cap, None)
        budgets = fleet_admission.pod_budgets(limit.calls, reports)
        updates = fleet_admission.push_order(budgets, reports, limit.reason)
        assert updates, "nothing to push"
        failed = await fleet_admission.push(session, {pod.name: pod}, port, updates, 5.0)
        assert failed == []
        after = (await read_fleet([pod], port, request_seconds=5.0, session=session)).reports()
    return after["worker-0"]


async def wait_gone(caller: TestParticipant, identity: str, timeout_s: float) -> float:
    """Until `identity` has left the caller's room; returns when it was seen gone."""
    deadline = time.monotonic() + timeout_s
    while identity in caller.room.remote_participants:
        if time.monotonic() > deadline:
            pytest.fail(f"{identity} did not leave within {timeout_s}s", pytrace=False)
        await asyncio.sleep(0.05)
    return time.monotonic()


async def test_callers_beyond_capacity_hear_the_overflow_message(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"overflow-{uuid.uuid4().hex[:6]}"
    providers.reset()
    config = overflow_config(dispatch_name, providers.base_url)
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        rooms = [f"overflow-{uuid.uuid4().hex[:8]}" for _ in range(5)]
        async with contextlib.AsyncExitStack() as stack:
            callers = []
            for index, room in enumerate(rooms):
                token = participant_token(
                    livekit.api_key, livekit.api_secret, room, f"caller-{index}"
                )
                callers.append(await stack.enter_async_context(TestParticipant(livekit.url, token)))

            async with livekit.api() as lkapi:
                dispatched_at = time.monotonic()
                await dispatch_at_once(lkapi, dispatch_name, rooms)

            agents = await asyncio.gather(
                *(caller.wait_for_participant(agent=True, timeout_s=60) for caller in callers)
            )
            reasons = [agent.attributes.get(OVERFLOW_ATTRIBUTE, "") for agent in agents]
            answered = [i for i, reason in enumerate(reasons) if not reason]
            overflowed = [i for i, reason in enumerate(reasons) if reason]
            assert len(answered) == 2, (reasons, worker.log_tail())
            assert len(overflowed) == 3, (reasons, worker.log_tail())
            assert {reasons[i] for i in overflowed} == {"capacity"}

            # The overflowed callers hear the message, then the overflow agent leaves.
            async def told(index: int) -> tuple[float, float]:
                caller, agent = callers[index], agents[index]
                heard_at = await caller.wait_for_audio(agent.identity, timeout_s=30)
                await caller.wait_for_speech_end(agent.identity, after=heard_at - 0.1)
                left_at = await wait_gone(caller, agent.identity, timeout_s=30)
                return heard_at - dispatched_at, left_at - dispatched_at

            # The answered callers hear the agent's greeting and keep the agent.
            async def greeted(index: int) -> float:
                caller, agent = callers[index], agents[index]
                return await caller.wait_for_audio(agent.identity, timeout_s=60) - dispatched_at

            told_times = await asyncio.gather(*(told(i) for i in overflowed))
            greeting_times = await asyncio.gather(*(greeted(i) for i in answered))
            for index in answered:
                assert agents[index].identity in callers[index].room.remote_participants

            texts = [str(request["text"]) for request in providers.requests("tts")]
            # The message is synthesised once per worker and replayed to every caller told.
            assert texts.count(OVERFLOW_MESSAGE) == 1, texts
            # The agents' greeting, one TTS request per sentence.
            assert texts.count(GREETING.split(". ")[0] + ".") == 2, texts

            metrics = worker.metrics()
            counted = {
                labels["reason"]: value
                for labels, value in sample_values(metrics, "voicefleet_calls_overflowed_total")
                if labels.get("agent") == "support"
            }
            assert counted.get("capacity") == 3, counted
            # At its capacity the worker still reports itself available (a claimable load), so
            # that livekit-server keeps offering it the callers it can only tell.
            await wait_until(
                "the overflow jobs ending (2 agent calls left)",
                lambda: worker.status()["active_jobs"] == 2,
                30,
            )
            assert worker.status()["worker_load"] == pytest.approx(OVER_BUDGET_LOAD)

            # The worker's own figure: from the offer (its decision) to the message's first
            # audio frame sent.
            after_offer = [
                float(seconds)
                for seconds in re.findall(r"message audio ([0-9.]+)s after the offer", worker.log())
            ]
            assert len(after_offer) == 3, worker.log_tail()
            record_property("offer_to_overflow_message_s", sorted(after_offer))
            message_s = sorted(heard for heard, _ in told_times)
            record_property("dispatch_to_overflow_message_s", [round(t, 3) for t in message_s])
            record_property(
                "dispatch_to_overflow_agent_gone_s", [round(t, 3) for _, t in told_times]
            )
            record_property("dispatch_to_greeting_s", [round(t, 3) for t in greeting_times])
            print(
                "overflow: dispatch -> overflow message audio "
                + ", ".join(f"{t:.2f}s" for t in message_s)
                + "; dispatch -> greeting of the answered calls "
                + ", ".join(f"{t:.2f}s" for t in sorted(greeting_times))
                + "; offer -> overflow message (worker) "
                + ", ".join(f"{t:.2f}s" for t in sorted(after_offer))
            )

            # One answered caller hangs up: the next caller gets the agent again.
            await callers[answered[0]].leave()
            await wait_until(
                "the ended call's job ending", lambda: worker.status()["active_jobs"] == 1, 30
            )
            # The operator's push (voicefleet_operator.admission, as each autoscaler evaluation
            # runs it): a cap of 1 call for the fleet, which runs 1 -> this worker may take none.
            capped = await push_cap(worker, 1)
            assert (capped.agent_jobs, capped.budget) == (1, 1)
            assert capped.limit_reason is OverflowReason.AGENT_LIMIT
            room = f"overflow-capped-{uuid.uuid4().hex[:8]}"
            token = participant_token(livekit.api_key, livekit.api_secret, room, "capped")
            async with TestParticipant(livekit.url, token) as caller:
                async with livekit.api() as lkapi:
                    await dispatch_at_once(lkapi, dispatch_name, [room])
                agent = await caller.wait_for_participant(agent=True, timeout_s=60)
                assert agent.attributes.get(OVERFLOW_ATTRIBUTE) == "agent_limit"
                await caller.wait_for_audio(agent.identity, timeout_s=30)
            counted = {
                labels["reason"]: value
                for labels, value in sample_values(
                    worker.metrics(), "voicefleet_calls_overflowed_total"
                )
                if labels.get("agent") == "support"
            }
            assert counted.get("agent_limit") == 1, counted

            # The cap lifted: the next caller gets the agent.
            lifted = await push_cap(worker, None)
            assert (lifted.budget, lifted.limit_reason) == (2, OverflowReason.CAPACITY)
            room = f"overflow-next-{uuid.uuid4().hex[:8]}"
            token = participant_token(livekit.api_key, livekit.api_secret, room, "caller-next")
            async with TestParticipant(livekit.url, token) as caller:
                async with livekit.api() as lkapi:
                    await dispatch_at_once(lkapi, dispatch_name, [room])
                agent = await caller.wait_for_participant(agent=True, timeout_s=60)
                assert OVERFLOW_ATTRIBUTE not in agent.attributes
                await caller.wait_for_audio(agent.identity, timeout_s=60)
                assert agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


# --- phone calls ------------------------------------------------------------------------------


@pytest.fixture
async def telephony(livekit: LiveKitEndpoint) -> AsyncIterator[tuple[TelephonyProvisioner, str]]:
    """A SIP trunk provisioner and a tenant of its own; its trunk and rule removed after."""
    tenant = f"ov-{secrets.token_hex(4)}"
    async with livekit.api() as client:
        provisioner = TelephonyProvisioner(client)
        yield provisioner, tenant
        await provisioner.remove(tenant, "agent")


def final_response(result: sipcall.CallResult) -> sipcall.SipPacket | None:
    """livekit-sip's final response to the INVITE (>= 200), or None."""
    for packet in result.capture.sip:
        if packet.outgoing or not re.match(r"SIP/2\.0 [2-6]\d\d", packet.first_line):
            continue
        if re.search(r"^CSeq:\s*\d+\s+INVITE\s*$", packet.text, re.M | re.I):
            return packet
    return None


async def test_phone_callers_beyond_capacity_are_rejected_with_486(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    telephony: tuple[TelephonyProvisioner, str],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Five simultaneous sipp calls to a worker that holds 2: two are answered by the agent
    (200 OK and its greeting), three get 486 Busy Here with the overflow reason and the cause
    480 the spec asked for, never answered, never left ringing."""
    provisioner, tenant = telephony
    target = make_target(tenant)
    await provisioner.ensure(target, [target.claim])
    providers.reset()
    config = overflow_config(target.dispatch_name, providers.base_url)
    config["overflow"] = {"message": OVERFLOW_MESSAGE, "sip": {"action": "reject", "status": 480}}
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        calls = [
            asyncio.to_thread(
                sipcall.place_call,
                "call.xml",
                target.numbers[0],
                tmp_path / f"call-{index}",
                caller=f"+1555000{index:04d}",
                talk_seconds=12,
                answer_timeout=30,
            )
            for index in range(5)
        ]
        results = await asyncio.gather(*calls)
        finals = [final_response(result) for result in results]
        codes = [int(f.first_line.split()[1]) if f else None for f in finals]
        described = "\n\n".join(r.describe() for r in results)
        assert sorted(c or 0 for c in codes) == [200, 200, 486, 486, 486], (codes, described)
        for result, final in zip(results, finals, strict=True):
            assert final is not None
            if final.first_line.startswith("SIP/2.0 200"):
                # The agent answered: its greeting reached the caller.
                assert result.capture.voiced_seconds() > 1.0, result.describe()
                continue
            headers = final.text.partition("\r\n\r\n")[0]
            assert re.search(r"^X-VoiceFleet-Overflow:\s*capacity\s*$", headers, re.M | re.I), (
                headers
            )
            assert re.search(r"^Reason:\s*SIP\s*;\s*cause=480", headers, re.M | re.I), headers
            assert result.answered_at is None and not result.capture.pcmu_frames()
        counted = {
            labels["reason"]: value
            for labels, value in sample_values(
                worker.metrics(), "voicefleet_calls_overflowed_total"
            )
            if labels.get("agent") == "support"
        }
        assert counted.get("capacity") == 3, counted

        rejected = [
            final.at - result.invite_at
            for result, final in zip(results, finals, strict=True)
            if final is not None and result.invite_at is not None and " 486 " in final.first_line
        ]
        answered = [r.invite_to_first_audio for r in results if r.invite_to_first_audio is not None]
        record_property("invite_to_486_s", sorted(round(t, 3) for t in rejected))
        record_property("invite_to_agent_first_audio_s", sorted(round(t or 0, 3) for t in answered))
        print(
            "overflow (SIP): INVITE -> 486 "
            + ", ".join(f"{t:.2f}s" for t in sorted(rejected))
            + "; INVITE -> agent's first audio "
            + ", ".join(f"{t:.2f}s" for t in sorted(answered))
        )


async def test_phone_callers_beyond_capacity_hear_the_message_then_a_bye(
    livekit: LiveKitEndpoint,
    sip: SipEndpoint,
    providers: ProviderServer,
    telephony: tuple[TelephonyProvisioner, str],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """sip.action message: three calls to a worker that holds 2; the third is answered, hears
    the overflow message and is hung up on (livekit-sip sends the BYE)."""
    provisioner, tenant = telephony
    target = make_target(tenant)
    await provisioner.ensure(target, [target.claim])
    providers.reset()
    config = overflow_config(target.dispatch_name, providers.base_url)
    config["overflow"] = {"message": OVERFLOW_MESSAGE, "sip": {"action": "message"}}
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        calls = [
            asyncio.to_thread(
                sipcall.place_call,
                "call.xml",
                target.numbers[0],
                tmp_path / f"call-{index}",
                caller=f"+1555100{index:04d}",
                talk_seconds=15,
                answer_timeout=30,
            )
            for index in range(3)
        ]
        results = await asyncio.gather(*calls)
        described = "\n\n".join(r.describe() for r in results)
        assert all(r.answered_at is not None for r in results), described
        hung_up = [r for r in results if r.capture.received_requests("BYE")]
        assert len(hung_up) == 1, described
        told = hung_up[0]
        assert told.capture.voiced_seconds() > 1.0, told.describe()
        assert told.invite_to_first_audio is not None
        counted = {
            labels["reason"]: value
            for labels, value in sample_values(
                worker.metrics(), "voicefleet_calls_overflowed_total"
            )
            if labels.get("agent") == "support"
        }
        assert counted.get("capacity") == 1, counted
        assert "overflow (capacity): told the caller" in worker.log()
        record_property("invite_to_overflow_message_audio_s", round(told.invite_to_first_audio, 3))
        print(f"overflow (SIP message): INVITE -> message audio {told.invite_to_first_audio:.2f}s")


# --- the platform's cap per namespace ----------------------------------------------------------


async def test_a_tenant_at_its_namespace_cap_does_not_take_another_tenants_calls(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    tmp_path: Path,
) -> None:
    """Noisy neighbour: tenant A's namespace is capped at 1 call by the platform, tenant B's is
    not. The operator's evaluation (autoscaler._share_the_caps, as it runs every 5 s) pushes
    A's worker a budget of 1; two callers each arrive at A and B at once: A answers one and
    tells the other (namespace_limit), B answers both."""
    providers.reset()
    workers_config = {}
    for tenant in ("tenant-a", "tenant-b"):
        config = overflow_config(f"{tenant}-{uuid.uuid4().hex[:6]}", providers.base_url)
        config["tenant"] = tenant
        workers_config[tenant] = config
    async with contextlib.AsyncExitStack() as stack:
        workers = {
            tenant: await stack.enter_async_context(
                running_worker(livekit, config, tmp_path / tenant)
            )
            for tenant, config in workers_config.items()
        }
        for tenant, cap in (("tenant-a", 1), ("tenant-b", None)):
            worker = workers[tenant]
            spec = parse_spec(
                {
                    "agents": [{"name": "front", "instructions": "Help."}],
                    "entry": "front",
                    "worker": {"jobsPerWorker": 2, "loadThreshold": 1.0,
                               "metricsPort": worker.metrics_port,
                               "healthPort": worker.health_port},
                }
            )  # fmt: skip
            pod = WorkerPod(name=f"{tenant}-0", ip="127.0.0.1", ready=True, terminating=False)
            ref = VoiceAgentRef(name="support", namespace=tenant, uid="uid")
            fleet = await read_fleet([pod], worker.metrics_port, request_seconds=5.0)
            assert [report.agent_jobs for report in fleet.reports().values()] == [0]
            limit = await autoscaler._share_the_caps(ref, spec, [pod], fleet, cap, 5.0)
            expected = (
                (1, OverflowReason.NAMESPACE_LIMIT) if cap else (None, OverflowReason.CAPACITY)
            )
            assert (limit.calls, limit.reason) == expected

        rooms = {
            tenant: [f"{tenant}-{uuid.uuid4().hex[:8]}" for _ in range(2)] for tenant in workers
        }
        callers: dict[str, list[TestParticipant]] = {}
        for tenant, tenant_rooms in rooms.items():
            callers[tenant] = [
                await stack.enter_async_context(
                    TestParticipant(
                        livekit.url,
                        participant_token(livekit.api_key, livekit.api_secret, room, "caller"),
                    )
                )
                for room in tenant_rooms
            ]
        async with livekit.api() as lkapi:
            await asyncio.gather(
                *(
                    dispatch_at_once(
                        lkapi, str(workers_config[tenant]["dispatchName"]), tenant_rooms
                    )
                    for tenant, tenant_rooms in rooms.items()
                )
            )
        reasons = {}
        for tenant, tenant_callers in callers.items():
            agents = await asyncio.gather(
                *(c.wait_for_participant(agent=True, timeout_s=60) for c in tenant_callers)
            )
            reasons[tenant] = sorted(a.attributes.get(OVERFLOW_ATTRIBUTE, "") for a in agents)
        assert reasons == {"tenant-a": ["", "namespace_limit"], "tenant-b": ["", ""]}, reasons
        for tenant, counted_reason in (("tenant-a", "namespace_limit"),):
            counted = {
                labels["reason"]: value
                for labels, value in sample_values(
                    workers[tenant].metrics(), "voicefleet_calls_overflowed_total"
                )
            }
            assert counted.get(counted_reason) == 1, counted


async def test_with_no_worker_at_all_the_call_ends_at_the_trunks_ringing_timeout(
    sip: SipEndpoint,
    telephony: tuple[TelephonyProvisioner, str],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """No worker registered for the number's agent (a fleet at zero, every worker restarting):
    nothing can tell the caller, so livekit-sip rings until the trunk's ringing_timeout
    (telephony.RINGING_TIMEOUT_SECONDS, not its default 3 minutes), then answers 486."""
    provisioner, tenant = telephony
    target = make_target(tenant)
    await provisioner.ensure(target, [target.claim])
    result = await asyncio.to_thread(
        sipcall.place_call,
        "call.xml",
        target.numbers[0],
        tmp_path / "call",
        answer_timeout=RINGING_TIMEOUT_SECONDS + 30,
        timeout=RINGING_TIMEOUT_SECONDS + 60,
    )
    final = final_response(result)
    assert final is not None and final.first_line.startswith("SIP/2.0 486"), result.describe()
    assert result.answered_at is None
    assert 180 in result.capture.responses(), result.describe()  # it rang meanwhile
    assert result.invite_at is not None
    rang = final.at - result.invite_at
    record_property("invite_to_486_without_worker_s", round(rang, 1))
    print(f"no worker: INVITE -> 486 after {rang:.1f}s of ringing")
