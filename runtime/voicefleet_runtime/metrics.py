"""Prometheus metrics of the runtime: `voicefleet_*`, labelled by tenant and agent.

Every series carries `tenant` (the VoiceAgent's namespace) and `agent` (the VoiceAgent's name);
per-turn and usage series add `llm_agent`, the configured agent (e.g. receptionist, billing) that
was speaking. Worker-side series (load, dispatch decisions) are written by the main process,
call-side series by the job processes; both show on the main process's /metrics because the
runtime runs prometheus_client in multiprocess mode. `voicefleet_runtime.__main__` sets
PROMETHEUS_MULTIPROC_DIR before this module (or livekit-agents) imports prometheus_client: the
value class is chosen at import time, and a process that imported it earlier would keep its
samples in memory where the collector never sees them.

Turn latency is measured by livekit-agents itself on the assistant's ChatMessage.metrics
(`e2e_latency`: the time the agent's first audio frame was played minus the time the caller
stopped speaking, per VAD), which is the quantity a caller experiences; its parts are exported too
(end-of-turn delay, STT delay, LLM TTFT, TTS TTFB), so a slow turn can be attributed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

LABELS = ("tenant", "agent")
TURN_LABELS = (*LABELS, "llm_agent")
USAGE_LABELS = (*LABELS, "llm_agent", "provider", "model")

# Voice turns live between ~200 ms and a few seconds; finer buckets at the low end.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
CALL_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 3600)

# --- worker (main process) ------------------------------------------------------------------

ACTIVE_JOBS = Gauge(
    "voicefleet_active_jobs",
    "Calls running on this worker (each job process adds 1 while its call runs).",
    LABELS,
    multiprocess_mode="livesum",
)
JOBS_CAPACITY = Gauge(
    "voicefleet_jobs_capacity",
    "Configured hard cap of simultaneous calls per worker (jobsPerWorker).",
    LABELS,
    multiprocess_mode="livemax",
)
AGENT_CAPACITY = Gauge(
    "voicefleet_agent_capacity",
    "Agent calls this worker takes at once: floor(jobsPerWorker x loadThreshold), or its share "
    "of spec.limits.maxConcurrentCalls; callers beyond it get the overflow treatment.",
    LABELS,
    multiprocess_mode="livemax",
)
WORKER_LOAD = Gauge(
    "voicefleet_worker_load",
    "Worker load: agent calls / jobsPerWorker (LiveKit itself is told a steering load that "
    "keeps a worker offered calls while it can still give the overflow treatment).",
    LABELS,
    multiprocess_mode="livemax",
)
DISPATCH_ACCEPTED = Counter(
    "voicefleet_dispatch_accepted_total",
    "Job requests from LiveKit this worker accepted.",
    LABELS,
)
DISPATCH_REJECTED = Counter(
    "voicefleet_dispatch_rejected_total",
    "Job offers from LiveKit this worker refused, by reason (overflow_full: no agent slot and "
    "no overflow slot; draining). LiveKit offers a refused job to the next worker.",
    (*LABELS, "reason"),
)
CALLS_OVERFLOWED = Counter(
    "voicefleet_calls_overflowed_total",
    "Calls given the overflow treatment (spec.overflow) instead of the agent, by reason: "
    "capacity (the worker's agent calls reached floor(jobsPerWorker x loadThreshold)), "
    "agent_limit (spec.limits.maxConcurrentCalls), namespace_limit (the platform's cap).",
    (*LABELS, "reason"),
)
TURN_DETECTOR_FALLBACK = Gauge(
    "voicefleet_turn_detector_fallback",
    "1 when the configured turn detector model could not be loaded and VAD turn detection "
    "is used instead.",
    (*LABELS, "requested"),
    multiprocess_mode="livemax",
)

# --- calls (job processes) ------------------------------------------------------------------

CALLS_STARTED = Counter(
    "voicefleet_calls_started_total", "Calls (jobs) that started on this worker.", LABELS
)
CALLS_ENDED = Counter(
    "voicefleet_calls_ended_total", "Calls that ended, by how they ended.", (*LABELS, "reason")
)
CALL_SECONDS = Counter(
    "voicefleet_call_seconds_total",
    "Connected call time in seconds (billing: minutes of service).",
    LABELS,
)
CALL_DURATION = Histogram(
    "voicefleet_call_duration_seconds", "Duration of ended calls.", LABELS, buckets=CALL_BUCKETS
)
DISPATCH_TO_GREETING = Histogram(
    "voicefleet_dispatch_to_greeting_seconds",
    "From the job request reaching the worker to the greeting's first audio.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
TURN_LATENCY = Histogram(
    "voicefleet_turn_latency_seconds",
    "End of the caller's speech to the start of the agent's audio reply.",
    TURN_LABELS,
    buckets=LATENCY_BUCKETS,
)
END_OF_TURN_DELAY = Histogram(
    "voicefleet_end_of_turn_delay_seconds",
    "End of the caller's speech to the decision that the turn is over.",
    TURN_LABELS,
    buckets=LATENCY_BUCKETS,
)
STT_DELAY = Histogram(
    "voicefleet_stt_delay_seconds",
    "End of the caller's speech to the final transcript.",
    TURN_LABELS,
    buckets=LATENCY_BUCKETS,
)
LLM_TTFT = Histogram(
    "voicefleet_llm_ttft_seconds",
    "LLM request to its first token.",
    TURN_LABELS,
    buckets=LATENCY_BUCKETS,
)
TTS_TTFB = Histogram(
    "voicefleet_tts_ttfb_seconds",
    "First text sent to TTS to its first audio byte.",
    TURN_LABELS,
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter(
    "voicefleet_errors_total",
    "Errors during calls, by component (llm, stt, tts, tool, mcp, job) and whether the call could "
    "go on (recoverable).",
    (*LABELS, "component", "recoverable"),
)
HANDOFFS = Counter(
    "voicefleet_handoffs_total",
    "Handoffs between agents.",
    (*LABELS, "from_agent", "to_agent"),
)
TOOL_CALLS = Counter(
    "voicefleet_tool_calls_total",
    "Webhook tool calls by outcome (ok, http_error, timeout, unreachable).",
    (*LABELS, "tool", "outcome"),
)
TOOL_LATENCY = Histogram(
    "voicefleet_tool_duration_seconds",
    "Webhook tool call duration.",
    (*LABELS, "tool"),
    buckets=LATENCY_BUCKETS,
)

# --- call records (main process) -----------------------------------------------------------

CALL_RECORDS = Counter(
    "voicefleet_call_records_total",
    "Call record delivery attempts by result: delivered, retried (an attempt that failed and "
    "will be repeated), failed (given up: a 4xx answer, or retryForSeconds passed).",
    (*LABELS, "result"),
)
CALL_RECORDS_PENDING = Gauge(
    "voicefleet_call_records_pending",
    "Call records in the worker's spool waiting for delivery.",
    LABELS,
    multiprocess_mode="livemax",
)
CALL_RECORD_DELIVERY_DELAY = Histogram(
    "voicefleet_call_record_delivery_delay_seconds",
    "From a call's record being spooled (the call ended) to its delivery.",
    LABELS,
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)

# --- usage a tenant can be billed from ------------------------------------------------------

LLM_PROMPT_TOKENS = Counter(
    "voicefleet_llm_prompt_tokens_total", "LLM input (prompt) tokens.", USAGE_LABELS
)
LLM_COMPLETION_TOKENS = Counter(
    "voicefleet_llm_completion_tokens_total", "LLM output (completion) tokens.", USAGE_LABELS
)
TTS_CHARACTERS = Counter(
    "voicefleet_tts_characters_total", "Characters sent to text-to-speech.", USAGE_LABELS
)
TTS_AUDIO_SECONDS = Counter(
    "voicefleet_tts_audio_seconds_total", "Seconds of speech synthesised.", USAGE_LABELS
)
STT_AUDIO_SECONDS = Counter(
    "voicefleet_stt_audio_seconds_total", "Seconds of caller audio transcribed.", USAGE_LABELS
)

ALL_METRICS = (
    ACTIVE_JOBS,
    JOBS_CAPACITY,
    WORKER_LOAD,
    DISPATCH_ACCEPTED,
    DISPATCH_REJECTED,
    CALLS_OVERFLOWED,
    AGENT_CAPACITY,
    TURN_DETECTOR_FALLBACK,
    CALLS_STARTED,
    CALLS_ENDED,
    CALL_SECONDS,
    CALL_DURATION,
    DISPATCH_TO_GREETING,
    TURN_LATENCY,
    END_OF_TURN_DELAY,
    STT_DELAY,
    LLM_TTFT,
    TTS_TTFB,
    ERRORS,
    HANDOFFS,
    TOOL_CALLS,
    TOOL_LATENCY,
    CALL_RECORDS,
    CALL_RECORDS_PENDING,
    CALL_RECORD_DELIVERY_DELAY,
    LLM_PROMPT_TOKENS,
    LLM_COMPLETION_TOKENS,
    TTS_CHARACTERS,
    TTS_AUDIO_SECONDS,
    STT_AUDIO_SECONDS,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(directory: str | None = None) -> list[int]:
    """Drop the live-mode gauge files of job processes that are gone.

    `livesum` gauges only stay correct when a dead process's files are removed
    (prometheus_client's `mark_process_dead`); a job process killed for memory never gets to
    decrement its active-jobs gauge itself. Returns the pids cleaned up.
    """
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    dead: set[int] = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid_text = path.stem.rsplit("_", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


def exposition(directory: str | None = None) -> bytes:
    """Every process's series from the multiprocess directory, in the text format.

    A job process that is just starting creates its file and writes the header a moment later;
    prometheus_client's collector fails on such a file (struct.error), and on one deleted between
    its listing and its read. /metrics must not answer 500 for that: unwritten files are left
    out, and a read that races a deletion is done again.
    """
    path = directory or os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for attempt in range(3):
        files = [str(f) for f in Path(path).glob("*.db") if _has_header(f)]
        try:
            registry = CollectorRegistry()
            registry.register(_Files(files))
            return generate_latest(registry)
        except (struct.error, FileNotFoundError):
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _has_header(file: Path) -> bool:
    try:
        return file.stat().st_size >= 8
    except FileNotFoundError:
        return False


class _Files:
    """A collector over the given multiprocess files (MultiProcessCollector reads all of them)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def collect(self) -> Iterable[Metric]:
        return multiprocess.MultiProcessCollector.merge(self.files, accumulate=True)
