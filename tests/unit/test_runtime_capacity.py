"""The hard cap: a worker never takes more than jobsPerWorker jobs, counting the ones accepted
but not yet running (LiveKit keeps offering jobs until the next load report)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from livekit.agents import JobRequest
from livekit.agents.job import JobAcceptArguments
from livekit.protocol import agent as agent_pb
from livekit.protocol import models
from prometheus_client import REGISTRY
from voicefleet_runtime.config import RuntimeConfig
from voicefleet_runtime.pipeline import TurnDetectionPlan
from voicefleet_runtime.worker import CapacityGate, WorkerRuntime


@pytest.mark.parametrize(
    ("active", "pending", "draining", "refusal"),
    [
        (0, 0, False, None),
        (1, 0, False, None),
        (0, 1, False, None),
        (1, 1, False, "at_capacity"),
        (0, 2, False, "at_capacity"),
        (2, 0, False, "at_capacity"),
        (0, 0, True, "draining"),
    ],
)
def test_refusal(active: int, pending: int, draining: bool, refusal: str | None) -> None:
    gate = CapacityGate(limit=2, pending=pending, draining=draining)
    assert gate.refusal(active) == refusal


def test_reserve_and_release() -> None:
    gate = CapacityGate(limit=2)
    assert gate.try_reserve(active=0) is None
    assert gate.try_reserve(active=0) is None
    assert gate.try_reserve(active=0) == "at_capacity"
    assert gate.pending == 2
    gate.release()
    gate.release()
    gate.release()  # never below zero
    assert gate.pending == 0


def test_load_is_active_over_capacity() -> None:
    gate = CapacityGate(limit=4, pending=3)
    assert [gate.load(active) for active in (0, 1, 2, 4, 5)] == [0, 0.25, 0.5, 1.0, 1.0]


def runtime(tenant: str, jobs_per_worker: int = 2) -> WorkerRuntime:
    config = RuntimeConfig.model_validate(
        {
            "tenant": tenant,
            "name": "support",
            "dispatchName": f"{tenant}-support",
            "agents": [{"name": "main", "instructions": "Help."}],
            "entry": "main",
            "worker": {"jobsPerWorker": jobs_per_worker},
        }
    )
    return WorkerRuntime(config, TurnDetectionPlan("vad", "vad"))


async def test_concurrent_requests_inside_the_report_window_are_capped() -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    worker = runtime(tenant)
    assignments = asyncio.Event()
    answers: dict[str, str] = {}

    def request(number: int) -> JobRequest:
        job_id = f"AJ_{number}"

        async def on_accept(args: JobAcceptArguments) -> None:
            answers[job_id] = "accepted"
            # LiveKit's assignment and the job process start take a while.
            await assignments.wait()

        async def on_reject(terminate: bool) -> None:
            answers[job_id] = f"rejected terminate={terminate}"

        job = agent_pb.Job(id=job_id, room=models.Room(name=f"room-{number}"))
        return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)

    tasks = [asyncio.create_task(worker.on_request(request(n))) for n in range(5)]
    await asyncio.sleep(0.1)
    # Two accepted and waiting for their assignment, the other three refused meanwhile, and
    # refused without terminating the job so LiveKit can offer it to another worker.
    assert sorted(answers.values()) == ["accepted"] * 2 + ["rejected terminate=False"] * 3
    assert worker.gate.pending == 2
    assignments.set()
    await asyncio.gather(*tasks)
    assert worker.gate.pending == 0

    labels = {"tenant": tenant, "agent": "support"}
    assert REGISTRY.get_sample_value("voicefleet_dispatch_accepted_total", labels) == 2
    rejected = {**labels, "reason": "at_capacity"}
    assert REGISTRY.get_sample_value("voicefleet_dispatch_rejected_total", rejected) == 3


async def test_a_failed_assignment_frees_its_slot() -> None:
    worker = runtime(f"t{uuid.uuid4().hex[:8]}", jobs_per_worker=1)

    async def on_accept(args: JobAcceptArguments) -> None:
        raise TimeoutError("assignment timed out")

    async def on_reject(terminate: bool) -> None:
        raise AssertionError("must not reject")

    job = agent_pb.Job(id="AJ_x", room=models.Room(name="room"))
    with pytest.raises(TimeoutError):
        await worker.on_request(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
    assert worker.gate.pending == 0


def test_livekit_agents_still_decides_availability_where_we_count_its_refusals() -> None:
    """CountingAgentServer wraps AgentServer._is_available (private): an upgrade that renames
    or drops it would silently stop counting refusals above loadThreshold."""
    import inspect

    from livekit.agents import AgentServer
    from voicefleet_runtime.worker import CountingAgentServer

    assert callable(getattr(AgentServer, "_is_available", None))
    source = inspect.getsource(AgentServer._answer_availability)
    assert "self._is_available()" in source
    assert CountingAgentServer._is_available is not AgentServer._is_available
