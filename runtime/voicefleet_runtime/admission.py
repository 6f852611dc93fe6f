"""Admission and overflow: which offered call a worker takes as an agent call, which it gives the
overflow treatment, and what it reports to LiveKit. Part of the config contract (pydantic and
the standard library only: the operator imports it through voicefleet_runtime.config).

Why the worker reports what it reports (source references in runtime/README.md, "Admission and
overflow"): livekit-server offers a job only to workers whose last status was AVAILABLE, picks
among them at random weighted by 1 - load, and its nodes claim a job only while some available
worker's load is below the server's `agents.target_load` (0.7 by default). A worker that reports
itself FULL therefore never hears of the callers it cannot take, and they wait in silence. So a
VoiceFleet worker stays AVAILABLE with a *steering load* below 0.7 for as long as it can still
give a caller the overflow treatment, and decides per offer in `on_request`:

- `agent`:    fewer agent calls than its budget (`admission.maxAgentJobs`, by default
              floor(jobsPerWorker x loadThreshold)) -> the call gets the agent;
- `overflow`: budget used up, an overflow slot free -> the call gets the overflow treatment
              (a short job: the message, a SIP rejection or a transfer) and is counted in
              voicefleet_calls_overflowed_total{reason};
- `refuse`:   draining, or agent budget and overflow slots both used -> the offer is declined
              (terminate=False: livekit-server tries the next worker at once).

The steering load grows from 0 to STEER_LOAD_MAX with the agent calls, so the server still
prefers workers with free agent slots; a worker at its budget reports OVER_BUDGET_LOAD, and only
a worker that cannot even take an overflow treatment reports FULL_LOAD (>= the threshold given
to livekit-agents, so it turns FULL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

OVERFLOW_ATTRIBUTE = "voicefleet.overflow"
"""Participant attribute of the agent that gives the overflow treatment; the value is the reason
(a client shows it). Set in the agent's token, so it is there the moment the agent joins."""

REPORT_PATH = "/report"
"""On worker.metricsPort: GET -> WorkerReport, what the operator's autoscaler and cap sharing read
(instead of livekit-agents' own /worker JSON, whose shape is the SDK's to change)."""

ADMISSION_PATH = "/admission"
"""On worker.metricsPort: PUT AdmissionUpdate (the operator's share of the caps for this worker);
answers the WorkerReport after it."""

OVERFLOW_HEADER = "X-VoiceFleet-Overflow"
"""SIP header on the final response of a rejected call; the value is the reason."""

LIVEKIT_TARGET_LOAD = 0.7
"""livekit-server's default `agents.target_load` (pkg/agent/config.go): a node claims a job only
while an available worker reports a load below it."""

STEER_LOAD_MAX = 0.6
"""Load reported by a worker whose agent budget is almost used up (< LIVEKIT_TARGET_LOAD)."""

OVER_BUDGET_LOAD = 0.65
"""Load reported by a worker at its agent budget that can still give the overflow treatment:
still claimable (< 0.7), the least likely to be picked."""

FULL_LOAD = 1.0
"""Load reported by a worker that can take nothing (agent budget and overflow slots used)."""

DEFAULT_OVERFLOW_SLOTS = 4
"""Overflow treatments a worker gives at once when it has fewer jobsPerWorker: a burst of
callers beyond capacity is told, not refused."""

LIVEKIT_LOAD_THRESHOLD = 0.95
"""load_threshold given to livekit-agents: only FULL_LOAD reaches it (the worker turns FULL)."""


class OverflowReason(StrEnum):
    """Why a caller got the overflow treatment (metric label and participant attribute)."""

    CAPACITY = "capacity"
    """The worker's agent calls reached its capacity (floor(jobsPerWorker x loadThreshold))."""
    AGENT_LIMIT = "agent_limit"
    """The VoiceAgent's spec.limits.maxConcurrentCalls (its share on this worker) is used."""
    NAMESPACE_LIMIT = "namespace_limit"
    """The platform's cap for the tenant namespace (its share on this worker) is used."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


DEFAULT_OVERFLOW_MESSAGE = (
    "Sorry, all of our agents are busy right now. Please try again in a few minutes. Goodbye."
)


def transfer_uri(target: str) -> str:
    """The transfer_to livekit-sip puts in the REFER's Refer-To: tel: for numbers, SIP as is."""
    if target.startswith(("sip:", "sips:", "tel:")):
        return target
    return f"tel:{target}"


class SipOverflow(_Model):
    """What a phone caller beyond capacity gets."""

    action: Literal["reject", "message", "transfer"] = "reject"
    """reject: the ringing call is refused with a final SIP status, no answer; message: answer,
    speak `overflow.message`, hang up; transfer: answer, speak the message, then transfer (SIP
    REFER) to `transferTo`."""
    status: Literal[486, 480, 503] = 486
    """For reject. livekit-sip 1.8.0 ends every unanswered call with 486 Busy Here (it has no way
    to choose another final status); 480 or 503 is then sent as the cause of a `Reason: SIP`
    header on that 486, which upstream carriers and PBXes can act on."""
    transfer_to: Annotated[str | None, Field(pattern=r"^\+[1-9][0-9]{6,14}$")] = None
    """For transfer: the overflow number, E.164."""

    @model_validator(mode="after")
    def _transfer_has_a_number(self) -> Self:
        if self.action == "transfer" and not self.transfer_to:
            raise ValueError(
                "sip.action transfer needs sip.transferTo, the overflow number (E.164)"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.action) || self.action != 'transfer' "
                    "|| has(self.transferTo)",
                    "message": "sip.action transfer needs sip.transferTo, the overflow number "
                    "(E.164)",
                    "fieldPath": ".transferTo",
                }
            ]
        }
    )


class OverflowOptions(_Model):
    """What a caller beyond capacity gets (when a cap is reached or no agent slot is free)."""

    message: Annotated[str, Field(min_length=1, max_length=500)] = DEFAULT_OVERFLOW_MESSAGE
    """Spoken to WebRTC callers (the agent joins, says it and leaves) and to phone callers when
    sip.action is message or transfer; synthesised with the pipeline's TTS."""
    sip: SipOverflow = SipOverflow()
    """Phone calls: reject with a SIP status, answer with the message, or transfer."""
    hold_message: Annotated[str | None, Field(min_length=1, max_length=500)] = None
    """Said to a caller while a fleet with no registered worker (scaled to zero, or every
    worker restarting) starts one: the platform's desk joins the room and says it, in the
    platform's voice (Helm desk.tts), which answers a phone call; then the agent takes over.
    Omit: a phone caller hears ringing, a WebRTC caller waits. When no worker comes in time,
    the desk says `message` and the phone call is hung up or, with sip.action transfer,
    transferred (an answered call cannot be rejected with a SIP status)."""


class AdmissionUpdate(_Model):
    """What the operator pushes to a worker (PUT /admission on worker.metricsPort): its share
    of the VoiceAgent's and the namespace's caps."""

    max_agent_jobs: Annotated[int, Field(ge=0, le=100)]
    """Agent calls the worker may run at once (capped at its capacity)."""
    limit_reason: OverflowReason
    """Which cap the share comes from."""


class WorkerReport(_Model):
    """What a worker tells the operator (GET /report on worker.metricsPort). The operator judges
    each pod by what it reports here, not by the spec: during a rollout that changes
    jobsPerWorker, old and new pods carry different capacities."""

    agent_jobs: int
    """Agent calls running, pending ones included."""
    pending_agent_jobs: int
    """Of `agent_jobs`, offers accepted whose job has not started yet."""
    overflow_jobs: int
    """Overflow treatments running (or about to)."""
    budget: int
    """Agent calls it admits now (its share of the caps)."""
    capacity: int
    """floor(jobsPerWorker x loadThreshold): agent calls it takes at most."""
    jobs_per_worker: int
    """worker.jobsPerWorker of the config this worker runs."""
    load_threshold: float
    """worker.loadThreshold of the config this worker runs."""
    limit_reason: OverflowReason
    overflow_slots: int
    draining: bool
    """Finishing its calls, taking no new ones."""
    registered: bool
    """Registered with LiveKit and connected: offers can reach it."""
    config_hash: str
    """Hash of the config file it runs (the operator's status.configHash for that config)."""

    @property
    def load(self) -> float:
        return worker_load(self.agent_jobs, self.jobs_per_worker)


class AdmissionSettings(_Model):
    """How many agent calls this worker admits (rendered by the operator from the caps)."""

    max_agent_jobs: Annotated[int | None, Field(ge=0, le=100)] = None
    """Agent calls this worker takes at once; omitted = floor(jobsPerWorker x loadThreshold),
    at least 1. The operator lowers it to this worker's share of the VoiceAgent's and the
    namespace's caps."""
    limit_reason: OverflowReason = OverflowReason.CAPACITY
    """Which limit `maxAgentJobs` comes from (the overflow reason counted when it is reached)."""
    overflow_slots: Annotated[int | None, Field(ge=0, le=100)] = None
    """Overflow treatments this worker gives at once (each is a short job process: a few
    seconds of TTS, no STT/LLM/VAD); omitted = max(DEFAULT_OVERFLOW_SLOTS, jobsPerWorker)."""


def worker_load(agent_jobs: int, jobs_per_worker: int) -> float:
    """A worker's load, the one definition: agent calls / jobsPerWorker, at most 1. The
    voicefleet_worker_load gauge (the HPA's metric and the dashboards'), the report the operator's
    autoscaler reads, and the autoscaler's fleet load all use it. (What a worker tells LiveKit is
    the steering load below, a different thing: it decides which worker gets the next offer.)"""
    return min(1.0, agent_jobs / jobs_per_worker)


def worker_capacity(jobs_per_worker: int, load_threshold: float) -> int:
    """Agent calls one worker takes: floor(jobsPerWorker x loadThreshold), at least 1.

    The same formula is used by the NoSpareCapacity alert and the operator's sums."""
    # the epsilon keeps 10 x 0.7 = 6.999... at 7
    return max(1, math.floor(jobs_per_worker * load_threshold + 1e-9))


# --- the decision (main process) --------------------------------------------------------------


class Admit(StrEnum):
    AGENT = "agent"
    OVERFLOW = "overflow"
    REFUSE = "refuse"


@dataclass
class AdmissionGate:
    """Per-worker admission. `agent_jobs` / `overflow_jobs` are the running jobs of each kind;
    `pending_*` the offers accepted whose job has not started yet. `admit` is synchronous, so
    concurrent offers on the event loop cannot both take the last slot."""

    budget: int
    overflow_slots: int
    reason: OverflowReason = OverflowReason.CAPACITY
    draining: bool = False
    pending_agent: int = 0
    pending_overflow: int = 0
    capacity: int = 0
    """floor(jobsPerWorker x loadThreshold): no budget goes above it (0: the budget is it)."""

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = self.budget

    @classmethod
    def for_worker(
        cls, jobs_per_worker: int, load_threshold: float, settings: AdmissionSettings
    ) -> AdmissionGate:
        capacity = worker_capacity(jobs_per_worker, load_threshold)
        slots = settings.overflow_slots
        if slots is None:
            slots = max(DEFAULT_OVERFLOW_SLOTS, jobs_per_worker)
        gate = cls(budget=capacity, overflow_slots=slots, capacity=capacity)
        if settings.max_agent_jobs is not None:
            gate.set_budget(settings.max_agent_jobs, settings.limit_reason)
        return gate

    def set_budget(self, budget: int, reason: OverflowReason) -> None:
        """A new agent-call budget (rendered, or pushed by the operator): never above the
        worker's capacity; `reason` is what the callers beyond it are counted under."""
        self.budget = max(0, min(budget, self.capacity))
        self.reason = reason if self.budget < self.capacity else OverflowReason.CAPACITY

    def admit(self, agent_jobs: int, overflow_jobs: int) -> tuple[Admit, str]:
        """(decision, reason): reason is the overflow reason or why the offer is refused."""
        if self.draining:
            return Admit.REFUSE, "draining"
        if agent_jobs + self.pending_agent < self.budget:
            self.pending_agent += 1
            return Admit.AGENT, ""
        if overflow_jobs + self.pending_overflow < self.overflow_slots:
            self.pending_overflow += 1
            return Admit.OVERFLOW, self.reason.value
        return Admit.REFUSE, "overflow_full"

    def started(self, decision: Admit) -> None:
        """The offer's job started (or the offer came to nothing): it is no longer pending."""
        if decision is Admit.AGENT:
            self.pending_agent = max(0, self.pending_agent - 1)
        elif decision is Admit.OVERFLOW:
            self.pending_overflow = max(0, self.pending_overflow - 1)

    def report(
        self,
        agent_jobs: int,
        overflow_jobs: int,
        *,
        jobs_per_worker: int,
        load_threshold: float,
        registered: bool,
        config_hash: str,
    ) -> WorkerReport:
        return WorkerReport(
            agent_jobs=agent_jobs + self.pending_agent,
            pending_agent_jobs=self.pending_agent,
            overflow_jobs=overflow_jobs + self.pending_overflow,
            budget=self.budget,
            capacity=self.capacity,
            jobs_per_worker=jobs_per_worker,
            load_threshold=load_threshold,
            limit_reason=self.reason,
            overflow_slots=self.overflow_slots,
            draining=self.draining,
            registered=registered,
            config_hash=config_hash,
        )

    def steering_load(self, agent_jobs: int, overflow_jobs: int) -> float:
        """The load reported to LiveKit (see the module docstring)."""
        if self.draining:
            return FULL_LOAD
        agents = agent_jobs + self.pending_agent
        if agents < self.budget:
            return STEER_LOAD_MAX * agents / self.budget
        if overflow_jobs + self.pending_overflow < self.overflow_slots:
            return OVER_BUDGET_LOAD
        return FULL_LOAD
