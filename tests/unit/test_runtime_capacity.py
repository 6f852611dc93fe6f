"""Admission: a worker takes floor(jobsPerWorker x loadThreshold) agent calls, gives the
overflow treatment to the next callers while it has overflow slots, and refuses only beyond
those, counting offers accepted but not yet running (LiveKit keeps offering jobs until the next
load report). What it reports to LiveKit keeps it offered jobs while it can still answer."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from livekit.agents import JobRequest
from livekit.agents.job import JobAcceptArguments
from livekit.protocol import agent as agent_pb
from livekit.protocol import models
from prometheus_client import REGISTRY
from voicefleet_runtime.admission import (
    FULL_LOAD,
    LIVEKIT_LOAD_THRESHOLD,
    LIVEKIT_TARGET_LOAD,
    OVER_BUDGET_LOAD,
    OVERFLOW_ATTRIBUTE,
    AdmissionGate,
    AdmissionSettings,
    Admit,
    OverflowReason,
    worker_capacity,
)
from voicefleet_runtime.config import RuntimeConfig
from voicefleet_runtime.pipeline import TurnDetectionPlan
from voicefleet_runtime.worker import WorkerRuntime


@pytest.mark.parametrize(
    ("jobs", "threshold", "capacity"),
    [(10, 0.7, 7), (2, 1.0, 2), (2, 0.7, 1), (3, 0.7, 2), (1, 0.1, 1), (100, 0.33, 33)],
)
def test_worker_capacity_is_floor_of_jobs_times_threshold(
    jobs: int, threshold: float, capacity: int
) -> None:
    assert worker_capacity(jobs, threshold) == capacity


def gate(budget: int = 2, slots: int = 2, **kwargs: object) -> AdmissionGate:
    return AdmissionGate(budget=budget, overflow_slots=slots, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("agents", "pending_agent", "overflows", "pending_overflow", "draining", "expected"),
    [
        (0, 0, 0, 0, False, (Admit.AGENT, "")),
        (1, 0, 0, 0, False, (Admit.AGENT, "")),
        (1, 1, 0, 0, False, (Admit.OVERFLOW, "capacity")),
        (2, 0, 0, 0, False, (Admit.OVERFLOW, "capacity")),
        (2, 0, 1, 0, False, (Admit.OVERFLOW, "capacity")),
        (2, 0, 1, 1, False, (Admit.REFUSE, "overflow_full")),
        (2, 0, 2, 0, False, (Admit.REFUSE, "overflow_full")),
        (0, 0, 0, 0, True, (Admit.REFUSE, "draining")),
        # full and draining: refused because it drains (it would take nothing even if it had room)
        (2, 0, 2, 0, True, (Admit.REFUSE, "draining")),
    ],
)
def test_admit(
    agents: int,
    pending_agent: int,
    overflows: int,
    pending_overflow: int,
    draining: bool,
    expected: tuple[Admit, str],
) -> None:
    g = gate(pending_agent=pending_agent, pending_overflow=pending_overflow, draining=draining)
    assert g.admit(agents, overflows) == expected


def test_pending_offers_take_slots_until_started() -> None:
    g = gate(budget=1, slots=1)
    assert g.admit(0, 0) == (Admit.AGENT, "")
    assert g.admit(0, 0) == (Admit.OVERFLOW, "capacity")
    assert g.admit(0, 0) == (Admit.REFUSE, "overflow_full")
    assert (g.pending_agent, g.pending_overflow) == (1, 1)
    g.started(Admit.AGENT)
    g.started(Admit.OVERFLOW)
    g.started(Admit.OVERFLOW)  # never below zero
    assert (g.pending_agent, g.pending_overflow) == (0, 0)


def test_steering_load_keeps_the_worker_claimable_until_it_cannot_answer() -> None:
    g = gate(budget=4, slots=2)
    loads = [g.steering_load(agents, 0) for agents in range(4)]
    # Rising with the agent calls, so livekit-server prefers workers with free agent slots...
    assert loads == sorted(loads) and loads[0] == 0
    # ...and below the server's target load, or the node would not claim the job at all.
    assert all(load < LIVEKIT_TARGET_LOAD for load in [*loads, OVER_BUDGET_LOAD])
    assert g.steering_load(4, 0) == OVER_BUDGET_LOAD > loads[-1]
    assert g.steering_load(4, 2) == FULL_LOAD >= LIVEKIT_LOAD_THRESHOLD
    g.draining = True
    assert g.steering_load(0, 0) == FULL_LOAD


def test_a_started_job_frees_its_own_pending_slot_only() -> None:
    """Two offers of each kind accepted; one of each starts (it is now running): the other of
    each is still pending and still holds its slot, so a fifth offer is refused."""
    g = gate(budget=2, slots=2)
    decisions = [g.admit(0, 0)[0] for _ in range(4)]
    assert decisions == [Admit.AGENT, Admit.AGENT, Admit.OVERFLOW, Admit.OVERFLOW]
    g.started(Admit.AGENT)
    g.started(Admit.OVERFLOW)
    assert g.admit(1, 1) == (Admit.REFUSE, "overflow_full")
    assert g.steering_load(1, 1) == FULL_LOAD


def test_offers_accepted_but_not_started_count_in_the_steering_load() -> None:
    """LiveKit keeps offering jobs until the next load report: offers accepted but not yet
    running must weigh on the load like running calls, or a burst lands on one worker."""
    g = gate(budget=4, slots=1)
    g.admit(0, 0)
    g.admit(0, 0)
    assert g.steering_load(0, 0) == gate(budget=4, slots=1).steering_load(2, 0) > 0
    g.admit(0, 0)
    g.admit(0, 0)  # the budget is used up by pending agent calls
    assert g.steering_load(0, 0) == OVER_BUDGET_LOAD
    assert g.admit(0, 0) == (Admit.OVERFLOW, "capacity")  # the only overflow slot, pending
    assert g.steering_load(0, 0) == FULL_LOAD


def test_a_gate_built_with_only_a_budget_takes_the_budget_as_its_capacity() -> None:
    g = AdmissionGate(budget=3, overflow_slots=1)
    g.set_budget(5, OverflowReason.AGENT_LIMIT)  # above the capacity: the capacity bounds it
    assert (g.budget, g.reason) == (3, OverflowReason.CAPACITY)
    g.set_budget(2, OverflowReason.AGENT_LIMIT)
    assert (g.budget, g.reason) == (2, OverflowReason.AGENT_LIMIT)
    report = g.report(
        0, 0, jobs_per_worker=3, load_threshold=1.0, registered=True, config_hash="ab12"
    )
    assert (report.budget, report.capacity) == (2, 3)


def test_gate_from_settings() -> None:
    default = AdmissionGate.for_worker(10, 0.7, AdmissionSettings())
    assert (default.budget, default.overflow_slots, default.reason) == (
        7,
        10,
        OverflowReason.CAPACITY,
    )
    capped = AdmissionGate.for_worker(
        10, 0.7, AdmissionSettings(max_agent_jobs=3, limit_reason=OverflowReason.AGENT_LIMIT)
    )
    assert (capped.budget, capped.overflow_slots, capped.reason) == (
        3,
        10,
        OverflowReason.AGENT_LIMIT,
    )
    # A share above what the worker can take is no limit: the worker's capacity is.
    roomy = AdmissionGate.for_worker(
        2, 1.0, AdmissionSettings(max_agent_jobs=5, limit_reason=OverflowReason.NAMESPACE_LIMIT)
    )
    assert (roomy.budget, roomy.overflow_slots, roomy.reason) == (2, 4, OverflowReason.CAPACITY)


def runtime(
    tenant: str, jobs_per_worker: int = 2, load_threshold: float = 1.0, overflow_slots: int = 4
) -> WorkerRuntime:
    config = RuntimeConfig.model_validate(
        {
            "tenant": tenant,
            "name": "support",
            "dispatchName": f"{tenant}-support",
            "agents": [{"name": "main", "instructions": "Help."}],
            "entry": "main",
            "worker": {"jobsPerWorker": jobs_per_worker, "loadThreshold": load_threshold},
            "admission": {"overflowSlots": overflow_slots},
        }
    )
    return WorkerRuntime(config, TurnDetectionPlan("vad", "vad"))


async def test_concurrent_offers_inside_the_report_window() -> None:
    """Five offers at once to a worker that takes 2 calls and gives 2 overflow treatments at
    once: 2 agent calls, 2 overflow treatments, 1 refused without terminating the job."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    worker = runtime(tenant, overflow_slots=2)
    assignments = asyncio.Event()
    answers: dict[str, str] = {}

    def request(number: int) -> JobRequest:
        job_id = f"AJ_{number}"

        async def on_accept(args: JobAcceptArguments) -> None:
            overflow = (args.attributes or {}).get(OVERFLOW_ATTRIBUTE)
            answers[job_id] = f"overflow {overflow} as {args.identity}" if overflow else "agent"
            # LiveKit's assignment and the job process start take a while.
            await assignments.wait()

        async def on_reject(terminate: bool) -> None:
            answers[job_id] = f"rejected terminate={terminate}"

        job = agent_pb.Job(id=job_id, room=models.Room(name=f"room-{number}"))
        return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)

    tasks = [asyncio.create_task(worker.on_request(request(n))) for n in range(5)]
    await asyncio.sleep(0.1)
    assert sorted(answers.values()) == [
        "agent",
        "agent",
        "overflow capacity as overflow-AJ_2",
        "overflow capacity as overflow-AJ_3",
        "rejected terminate=False",
    ]
    assert (worker.admission.pending_agent, worker.admission.pending_overflow) == (2, 2)
    assignments.set()
    await asyncio.gather(*tasks)
    assert (worker.admission.pending_agent, worker.admission.pending_overflow) == (0, 0)

    labels = {"tenant": tenant, "agent": "support"}
    assert REGISTRY.get_sample_value("voicefleet_dispatch_accepted_total", labels) == 2
    overflowed = {**labels, "reason": "capacity"}
    assert REGISTRY.get_sample_value("voicefleet_calls_overflowed_total", overflowed) == 2
    rejected = {**labels, "reason": "overflow_full"}
    assert REGISTRY.get_sample_value("voicefleet_dispatch_rejected_total", rejected) == 1


async def test_a_failed_assignment_frees_its_slot() -> None:
    worker = runtime(f"t{uuid.uuid4().hex[:8]}", jobs_per_worker=1)

    async def on_accept(args: JobAcceptArguments) -> None:
        raise TimeoutError("assignment timed out")

    async def on_reject(terminate: bool) -> None:
        raise AssertionError("must not reject")

    job = agent_pb.Job(id="AJ_x", room=models.Room(name="room"))
    with pytest.raises(TimeoutError):
        await worker.on_request(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
    assert worker.admission.pending_agent == 0


def test_livekit_agents_availability_hooks_still_exist() -> None:
    """CountingAgentServer overrides AgentServer._get_effective_load and wraps _is_available
    (private): an upgrade that renames or drops them would bring back livekit-agents' own
    estimate, turning a worker FULL in a burst, and stop counting its refusals."""
    import inspect

    from livekit.agents import AgentServer
    from voicefleet_runtime.worker import CountingAgentServer

    assert callable(getattr(AgentServer, "_is_available", None))
    assert callable(getattr(AgentServer, "_get_effective_load", None))
    assert "self._is_available()" in inspect.getsource(AgentServer._answer_availability)
    assert "self._get_effective_load()" in inspect.getsource(AgentServer._is_available)
    assert "self._get_effective_load()" in inspect.getsource(AgentServer._update_worker_status)
    assert CountingAgentServer._is_available is not AgentServer._is_available
    assert CountingAgentServer._get_effective_load is not AgentServer._get_effective_load


def test_running_jobs_are_told_apart_by_the_overflow_attribute() -> None:
    from types import SimpleNamespace

    worker = runtime(f"t{uuid.uuid4().hex[:8]}")

    def job(attributes: dict[str, str] | None) -> SimpleNamespace:
        return SimpleNamespace(accept_arguments=SimpleNamespace(attributes=attributes))

    server = SimpleNamespace(
        active_jobs=[job(None), job({}), job({OVERFLOW_ATTRIBUTE: "capacity"})]
    )
    assert worker.running_jobs(server) == (2, 1)  # type: ignore[arg-type]
    # The load LiveKit sees is the steering load; the metric is agent calls / jobsPerWorker.
    assert worker.load(server) == OVER_BUDGET_LOAD  # type: ignore[arg-type]


async def test_a_draining_worker_refuses_offers_even_with_free_slots() -> None:
    from types import SimpleNamespace

    tenant = f"t{uuid.uuid4().hex[:8]}"
    worker = runtime(tenant)
    running = SimpleNamespace(accept_arguments=SimpleNamespace(attributes={}))
    worker.server = SimpleNamespace(draining=True, active_jobs=[running])  # type: ignore[assignment]
    answers: list[str] = []

    async def on_accept(args: JobAcceptArguments) -> None:
        answers.append("accepted")

    async def on_reject(terminate: bool) -> None:
        answers.append(f"rejected terminate={terminate}")

    job = agent_pb.Job(id="AJ_drain", room=models.Room(name="room-drain"))
    await worker.on_request(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
    assert answers == ["rejected terminate=False"]
    labels = {"tenant": tenant, "agent": "support"}
    assert (
        REGISTRY.get_sample_value(
            "voicefleet_dispatch_rejected_total", {**labels, "reason": "draining"}
        )
        == 1
    )


def test_refusals_by_livekit_agents_say_draining_or_overflow_full() -> None:
    from voicefleet_runtime.worker import CountingAgentServer

    server = CountingAgentServer(load_threshold=LIVEKIT_LOAD_THRESHOLD)
    reasons: list[str] = []
    server.on_refused = reasons.append
    server._devmode = False  # set by run(), which a unit test does not call
    server._worker_load = FULL_LOAD  # no agent slot and no overflow slot left
    assert server._is_available() is False
    server._worker_load = 0.0
    server._draining = True
    assert server._is_available() is False
    server._draining = False
    assert server._is_available() is True
    assert reasons == ["overflow_full", "draining"]
