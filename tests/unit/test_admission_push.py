"""The operator's push of a worker's share of the caps (PUT /admission), worker side."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from voicefleet_runtime.admission import (
    AdmissionGate,
    AdmissionSettings,
    AdmissionUpdate,
    Admit,
    OverflowReason,
    WorkerReport,
    worker_load,
)


def report_of(
    gate: AdmissionGate, agent_jobs: int, overflow_jobs: int, slots: int = 4
) -> WorkerReport:
    return gate.report(
        agent_jobs,
        overflow_jobs,
        jobs_per_worker=slots,
        load_threshold=1.0,
        registered=True,
        config_hash="ab12",
    )


def test_a_pushed_budget_never_exceeds_the_capacity_and_says_its_reason() -> None:
    gate = AdmissionGate.for_worker(10, 0.7, AdmissionSettings())
    gate.set_budget(3, OverflowReason.NAMESPACE_LIMIT)
    assert (gate.budget, gate.reason) == (3, OverflowReason.NAMESPACE_LIMIT)
    gate.set_budget(50, OverflowReason.AGENT_LIMIT)
    assert (gate.budget, gate.reason) == (7, OverflowReason.CAPACITY)
    gate.set_budget(0, OverflowReason.AGENT_LIMIT)
    assert gate.admit(0, 0) == (Admit.OVERFLOW, "agent_limit")


def test_a_lowered_budget_keeps_running_calls_and_overflows_new_ones() -> None:
    gate = AdmissionGate.for_worker(4, 1.0, AdmissionSettings())
    assert [gate.admit(0, 0)[0] for _ in range(3)] == [Admit.AGENT] * 3
    gate.set_budget(1, OverflowReason.AGENT_LIMIT)  # 3 pending calls go on
    assert gate.admit(0, 0) == (Admit.OVERFLOW, "agent_limit")
    assert report_of(gate, 0, 0).agent_jobs == 3


def test_the_report_counts_offers_accepted_but_not_started() -> None:
    """The operator's autoscaler and cap sharing read the report: an accepted offer whose job
    has not started yet is a call of its kind, agent or overflow treatment."""
    gate = AdmissionGate.for_worker(1, 1.0, AdmissionSettings(overflow_slots=3))
    assert gate.admit(0, 0) == (Admit.AGENT, "")
    assert gate.admit(0, 1) == (Admit.OVERFLOW, "capacity")  # one treatment already running
    report = report_of(gate, 0, 1)
    assert (report.agent_jobs, report.pending_agent_jobs, report.overflow_jobs) == (1, 1, 2)


def test_report_and_update_wire_format() -> None:
    gate = AdmissionGate.for_worker(2, 1.0, AdmissionSettings())
    gate.admit(1, 0)
    report = report_of(gate, 1, 2, slots=2)
    assert report.model_dump(mode="json", by_alias=True) == {
        "agentJobs": 2,
        "pendingAgentJobs": 1,
        "overflowJobs": 2,
        "budget": 2,
        "capacity": 2,
        "jobsPerWorker": 2,
        "loadThreshold": 1.0,
        "limitReason": "capacity",
        "overflowSlots": 4,
        "draining": False,
        "registered": True,
        "configHash": "ab12",
    }
    assert report.load == 1.0
    assert WorkerReport.model_validate_json(report.model_dump_json(by_alias=True)) == report
    update = AdmissionUpdate.model_validate({"maxAgentJobs": 1, "limitReason": "agent_limit"})
    assert update.max_agent_jobs == 1
    with pytest.raises(ValidationError):
        AdmissionUpdate.model_validate({"maxAgentJobs": -1, "limitReason": "agent_limit"})
    with pytest.raises(ValidationError):
        AdmissionUpdate.model_validate({"maxAgentJobs": 1, "limitReason": "whatever"})


def test_load_is_agent_calls_over_jobs_per_worker_at_most_one() -> None:
    assert worker_load(0, 4) == 0.0
    assert worker_load(3, 4) == 0.75
    assert worker_load(5, 4) == 1.0  # pending calls beyond the slots do not push it past full


async def test_the_desk_treats_overflow_in_the_main_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With LiveKit credentials the worker answers an overflow offer with terminate (LiveKit
    ends the job, offers it to no one else) and its desk joins the room itself."""
    import uuid

    from livekit.agents import JobRequest
    from livekit.agents.job import JobAcceptArguments
    from livekit.protocol import agent as agent_pb
    from livekit.protocol import models
    from voicefleet_runtime.config import RuntimeConfig
    from voicefleet_runtime.pipeline import TurnDetectionPlan
    from voicefleet_runtime.worker import WorkerRuntime

    for name, value in {
        "LIVEKIT_URL": "ws://127.0.0.1:1",
        "LIVEKIT_API_KEY": "key",
        "LIVEKIT_API_SECRET": "secret-secret-secret-secret-secret",
    }.items():
        monkeypatch.setenv(name, value)
    config = RuntimeConfig.model_validate(
        {
            "tenant": f"t{uuid.uuid4().hex[:8]}",
            "name": "support",
            "dispatchName": "support-x",
            "agents": [{"name": "main", "instructions": "Help."}],
            "entry": "main",
            "worker": {"jobsPerWorker": 1, "loadThreshold": 1.0},
        }
    )
    worker = WorkerRuntime(config, TurnDetectionPlan("vad", "vad"))
    assert worker.desk is not None
    started: list[tuple[str, str, str]] = []
    monkeypatch.setattr(
        worker.desk, "start", lambda job, room, reason, at: started.append((job, room, reason))
    )
    answers: list[str] = []

    async def on_accept(args: JobAcceptArguments) -> None:
        answers.append("accepted")

    async def on_reject(terminate: bool) -> None:
        answers.append(f"rejected terminate={terminate}")

    worker.admission.set_budget(0, OverflowReason.AGENT_LIMIT)
    job = agent_pb.Job(id="AJ_1", room=models.Room(name="room-1"))
    await worker.on_request(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
    assert answers == ["rejected terminate=True"]
    assert started == [("AJ_1", "room-1", "agent_limit")]


def test_the_overflow_token_is_an_agent_token_with_the_reason() -> None:
    from livekit import api
    from voicefleet_runtime.config import RuntimeConfig
    from voicefleet_runtime.overflow import overflow_token

    config = RuntimeConfig.model_validate(
        {
            "tenant": "acme",
            "name": "support",
            "dispatchName": "acme-support",
            "agents": [{"name": "main", "instructions": "Help."}],
            "entry": "main",
        }
    )
    secret = "secret-secret-secret-secret-secret"
    token = overflow_token(config, "key", secret, "AJ_9", "room-9", "capacity")
    claims = api.TokenVerifier("key", secret).verify(token)
    assert claims.identity == "overflow-AJ_9"
    assert claims.kind == "agent"
    assert claims.attributes == {"voicefleet.overflow": "capacity", "lk.agent_name": "acme-support"}
    assert claims.video is not None
    assert (claims.video.room, claims.video.room_join, claims.video.agent) == ("room-9", True, True)
