"""voicefleet_* metrics: naming, labels, multiprocess collection, and per-call accounting."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from livekit.agents import AgentSession, CloseEvent, ConversationItemAddedEvent
from livekit.agents.llm import ChatMessage
from livekit.agents.metrics import AgentSessionUsage, LLMModelUsage, STTModelUsage, TTSModelUsage
from livekit.agents.voice.events import CloseReason, SessionUsageUpdatedEvent
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from voicefleet_runtime import metrics
from voicefleet_runtime.telemetry import CallTelemetry


def test_names_and_labels_follow_prometheus_conventions() -> None:
    for metric in metrics.ALL_METRICS:
        name = metric._name
        assert name.startswith("voicefleet_"), name
        assert {"tenant", "agent"} <= set(metric._labelnames), name
        if isinstance(metric, Histogram):
            assert name.endswith("_seconds"), name
        if isinstance(metric, Counter):
            # prometheus_client exposes counters as <name>_total.
            assert not name.endswith("_total"), name
        if isinstance(metric, Gauge):
            assert not name.endswith(("_total", "_count")), name
    exposed = {
        sample_name
        for family in REGISTRY.collect()
        for sample_name in (s.name for s in family.samples)
        if sample_name.startswith("voicefleet_")
    }
    assert all(not n.endswith("_total_total") for n in exposed)


def test_job_process_metrics_reach_the_main_process(tmp_path: Path) -> None:
    """In multiprocess mode, a job process's counters outlive it; its live gauges go away
    once the main process reaps it."""
    script = textwrap.dedent(
        """
        import json, multiprocessing, sys
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from voicefleet_runtime import metrics

        LABELS = {"tenant": "acme", "agent": "support"}

        def job():
            metrics.CALLS_STARTED.labels(**LABELS).inc()
            metrics.ACTIVE_JOBS.labels(**LABELS).inc()

        def collect():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return {
                name: registry.get_sample_value(name, LABELS)
                for name in ("voicefleet_calls_started_total", "voicefleet_active_jobs")
            }

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(target=job)
            process.start()
            process.join()
            before = collect()
            reaped = metrics.reap_dead_processes()
            print(json.dumps({"before": before, "after": collect(),
                              "reaped": reaped == [process.pid]}))
        """
    )
    (tmp_path / "job.py").write_text(script)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        '{"before": {"voicefleet_calls_started_total": 1.0, "voicefleet_active_jobs": 1.0}, '
        '"after": {"voicefleet_calls_started_total": 1.0, "voicefleet_active_jobs": null}, '
        '"reaped": true}'
    )


def usage_event(
    prompt: int, completion: int, characters: int, audio: float
) -> SessionUsageUpdatedEvent:
    return SessionUsageUpdatedEvent(
        usage=AgentSessionUsage(
            model_usage=[
                LLMModelUsage(
                    provider="127.0.0.1:8300",
                    model="gpt-4o-mini",
                    input_tokens=prompt,
                    output_tokens=completion,
                ),
                TTSModelUsage(provider="x", model="tts-1", characters_count=characters),
                STTModelUsage(provider="x", model="whisper-1", audio_duration=audio),
            ]
        )
    )


async def test_call_telemetry_turns_cumulative_usage_into_counters() -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    labels = {"tenant": tenant, "agent": "support"}
    providers = {"llm_usage": "openai", "tts_usage": "openai", "stt_usage": "deepgram"}
    telemetry = CallTelemetry(labels, providers)
    session: AgentSession[None] = AgentSession()
    current = ["receptionist"]
    telemetry.attach(session, current_agent=lambda: current[0])
    assert REGISTRY.get_sample_value("voicefleet_active_jobs", labels) == 1

    session.emit("session_usage_updated", usage_event(100, 10, 40, 2.5))
    current[0] = "billing"
    # Usage totals are per session: only the growth counts, and goes to the current agent.
    session.emit("session_usage_updated", usage_event(250, 30, 40, 4.0))

    def value(name: str, agent: str, provider: str, model: str) -> float | None:
        return REGISTRY.get_sample_value(
            name, {**labels, "llm_agent": agent, "provider": provider, "model": model}
        )

    prompt = "voicefleet_llm_prompt_tokens_total"
    assert value(prompt, "receptionist", "openai", "gpt-4o-mini") == 100
    assert value(prompt, "billing", "openai", "gpt-4o-mini") == 150
    completion = "voicefleet_llm_completion_tokens_total"
    assert value(completion, "billing", "openai", "gpt-4o-mini") == 20
    assert value("voicefleet_tts_characters_total", "receptionist", "openai", "tts-1") == 40
    assert value("voicefleet_tts_characters_total", "billing", "openai", "tts-1") is None
    stt = "voicefleet_stt_audio_seconds_total"
    assert value(stt, "billing", "deepgram", "whisper-1") == 1.5

    reply = ChatMessage(role="assistant", content=["Hi"])
    reply.metrics = {"llm_node_ttft": 0.2, "tts_node_ttfb": 0.1, "e2e_latency": 0.7}
    session.emit("conversation_item_added", ConversationItemAddedEvent(item=reply))
    turn = {**labels, "llm_agent": "billing"}
    assert REGISTRY.get_sample_value("voicefleet_turn_latency_seconds_count", turn) == 1
    assert REGISTRY.get_sample_value("voicefleet_turn_latency_seconds_sum", turn) == 0.7
    assert REGISTRY.get_sample_value("voicefleet_llm_ttft_seconds_sum", turn) == 0.2

    session.emit("close", CloseEvent(reason=CloseReason.PARTICIPANT_DISCONNECTED))
    telemetry.end("job_shutdown")  # counted once
    ended = {**labels, "reason": "participant_disconnected"}
    assert REGISTRY.get_sample_value("voicefleet_calls_ended_total", ended) == 1
    assert REGISTRY.get_sample_value("voicefleet_active_jobs", labels) == 0
    seconds = REGISTRY.get_sample_value("voicefleet_call_seconds_total", labels)
    assert seconds is not None and seconds > 0


def test_exposition_survives_a_job_process_that_is_just_creating_its_file(tmp_path: Path) -> None:
    """A starting job process creates its .db file and writes its header a moment later; the
    plain MultiProcessCollector fails on the empty file (a /metrics 500 seen in a full test
    run), metrics.exposition leaves it out and still serves every other series."""
    script = textwrap.dedent(
        """
        import json, multiprocessing, os, struct
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from voicefleet_runtime import metrics

        def job():
            metrics.CALLS_STARTED.labels(tenant="acme", agent="support").inc()

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(target=job)
            process.start()
            process.join()
            directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
            open(os.path.join(directory, "counter_999999.db"), "wb").close()  # no header yet
            try:
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
                generate_latest(registry)
                plain = "ok"
            except struct.error:
                plain = "struct.error"
            text = metrics.exposition().decode()
            print(json.dumps({"plain": plain, "served": 'voicefleet_calls_started_total{'
                              'agent="support",tenant="acme"} 1.0' in text}))
        """
    )
    (tmp_path / "job.py").write_text(script)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == '{"plain": "struct.error", "served": true}'


def test_reaping_removes_only_the_files_of_dead_processes(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped by us: its pid names no process now
    alive, dead = os.getpid(), child.pid
    files = {
        pid: [tmp_path / f"gauge_livesum_{pid}.db", tmp_path / f"gauge_liveall_{pid}.db"]
        for pid in (alive, dead)
    }
    counter = tmp_path / f"counter_{dead}.db"  # counters of dead processes keep counting
    for path in [*files[alive], *files[dead], counter]:
        path.write_bytes(b"")
    assert metrics.reap_dead_processes(str(tmp_path)) == [dead]
    assert all(path.exists() for path in files[alive])
    assert not any(path.exists() for path in files[dead])
    assert counter.exists()


def test_reaping_reads_the_multiprocess_directory_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gauge = tmp_path / f"gauge_livesum_{child.pid}.db"
    gauge.write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert metrics.reap_dead_processes() == [child.pid]
    assert not gauge.exists()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert metrics.reap_dead_processes() == []


def test_reaping_leaves_a_live_process_running(tmp_path: Path) -> None:
    """Checking whether a job process is alive must not disturb it: a live process's files are
    kept and the process keeps running until it is stopped on purpose."""
    # Default signal actions in the child, even when the tests run under nohup (SIGHUP ignored
    # and inherited), so that any signal sent while reaping would show.
    child = subprocess.Popen(
        ["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)
    )
    try:
        gauge = tmp_path / f"gauge_livesum_{child.pid}.db"
        gauge.write_bytes(b"")
        assert metrics.reap_dead_processes(str(tmp_path)) == []
        assert gauge.exists()
    finally:
        child.terminate()
        child.wait()
    # Only our SIGTERM ended it: a signal sent while reaping (SIGHUP, a lower number, is
    # delivered first) would have ended it with that signal instead.
    assert child.returncode == -signal.SIGTERM


def test_reaping_keeps_the_files_of_a_process_it_may_not_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process of another user answers kill(pid, 0) with EPERM: it exists, so its files
    stay (this happens whenever the runtime does not run as root)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gauge = tmp_path / f"gauge_livesum_{child.pid}.db"
    gauge.write_bytes(b"")

    def not_permitted(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(metrics.os, "kill", not_permitted)
    assert metrics.reap_dead_processes(str(tmp_path)) == []
    assert gauge.exists()
