"""VoiceFleet's runtime against the agent a team writes without it, doing the same work.

Both workers run at once as host processes against the same livekit-server and the same local
provider servers (voicefleet_testkit.providers, in this process):

  voicefleet  `python -m voicefleet_runtime start` with the config the operator renders for a
              VoiceAgent of one agent: the baseline's instructions and greeting, the pipeline and
              worker settings of examples/voiceagent.yaml (providers pointed at the local servers)
  baseline    bench/baseline_agent.py: plain livekit-agents, the seeds' minimal agent with the
              same plugins, models, options, instructions and greeting

Every call follows one script: dial (a token that dispatches the agent), wait for the agent to
join and greet, then two caller turns of scripted speech (espeak-ng, synthesised once), each
answered by the agent (the LLM server replies the same line to every turn). Calls alternate
between the two sides (VoiceFleet first on even calls, the baseline first on odd ones) so that
the machine's drift hits both; then a ramp of concurrent calls, level by level, both sides at
each level before the next.

Figures per side: dispatch -> agent joined; dispatch -> first greeting audio; turn latency (end
of the caller's speech -> first agent audio); idle worker PSS (all processes, several readings);
PSS per active call (ramp level's PSS over the idle reading before it, per call); CPU seconds per
call-minute (per single call: the worker tree's CPU from dial until its job process has exited
and been reaped, over the call's length; includes the replacement idle process's prewarm);
calls per core (stats.calls_per_core over the ramp).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from voicefleet_testkit.net import free_port
from voicefleet_testkit.participant import ParticipantError, TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer
from voicefleet_testkit.providers.audio import PcmAudio, synthesize
from voicefleet_testkit.waiting import WaitTimeout, wait_until

from voicefleet_localdev import paths
from voicefleet_localdev.bench import baseline_agent, stats
from voicefleet_localdev.bench.workers import MB, BenchError, WorkerProcess
from voicefleet_localdev.livekit import LiveKitEndpoint

EXAMPLE = paths.REPO_ROOT / "examples" / "voiceagent.yaml"
CALLER_TURNS = ("Hello, I would like to check on my order.", "Thank you, that is all.")
REPLY = "Sure, one moment please."
JOBS_PER_WORKER = 16  # x loadThreshold 0.7: 11 calls per worker, above the default ramp's top
PROVIDER_PATHS = ("deepgram-elevenlabs", "openai")
WAIT_S = 60.0
QUIET_S = 0.8  # the agent's speech is over when it has been quiet this long
SETTLE_S = 3.0
IDLE_READINGS = 3
IDLE_CPU_S = 10.0  # how long the idle workers' CPU is measured

Report = Callable[[str], None]


# --- the two workers ---------------------------------------------------------------------------


def pipeline_spec(providers: Any, provider_path: str) -> dict[str, Any]:
    """The example's pipeline with the STT/TTS of `provider_path` and the baseline's models."""
    pipeline = yaml.safe_load(EXAMPLE.read_text())["spec"]["pipeline"]
    llm = {"provider": "openai", "model": baseline_agent.LLM_MODEL, "baseUrl": providers.base_url}
    stt_model = baseline_agent.STT_MODEL[provider_path]
    tts_model = baseline_agent.TTS_MODEL[provider_path]
    if provider_path == "openai":
        stt = {"provider": "openai", "model": stt_model, "baseUrl": providers.base_url}
        tts = {"provider": "openai", "model": tts_model, "baseUrl": providers.base_url}
    else:
        stt = {"provider": "deepgram", "model": stt_model, "baseUrl": providers.url}
        tts = {"provider": "elevenlabs", "model": tts_model, "baseUrl": providers.base_url}
    stt["language"] = baseline_agent.LANGUAGE
    return {**pipeline, "stt": stt, "llm": llm, "tts": tts}


def voiceagent_spec(providers: Any, provider_path: str, idle_processes: int) -> dict[str, Any]:
    """The VoiceAgent under test: one agent with the baseline's instructions and greeting, no
    tools or telephony (the baseline has none), the example's pipeline and worker settings."""
    example = yaml.safe_load(EXAMPLE.read_text())["spec"]
    return {
        "agents": [
            {
                "name": "receptionist",
                "instructions": baseline_agent.INSTRUCTIONS,
                "greeting": baseline_agent.GREETING,
            }
        ],
        "entry": "receptionist",
        "pipeline": pipeline_spec(providers, provider_path),
        "worker": {
            **example["worker"],
            "idleProcesses": idle_processes,
            "jobsPerWorker": JOBS_PER_WORKER,
        },
        "secretRefs": example["secretRefs"],
    }


def voicefleet_worker(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    provider_path: str,
    workdir: Path,
    idle_processes: int,
) -> tuple[WorkerProcess, str, str]:
    """The runtime, its dispatch name and the turn detection it will actually run."""
    from voicefleet_operator.api import VoiceAgentSpec
    from voicefleet_operator.render import VoiceAgentRef, runtime_config
    from voicefleet_runtime.config import RuntimeConfig
    from voicefleet_runtime.pipeline import plan_turn_detection

    spec = voiceagent_spec(providers, provider_path, idle_processes)
    ref = VoiceAgentRef("bench", f"bench-{secrets.token_hex(3)}", "bench")
    rendered = runtime_config(ref, VoiceAgentSpec.model_validate(spec))
    config = rendered.model_dump(by_alias=True, mode="json", exclude_none=True)
    config["worker"]["healthPort"] = free_port()
    config["worker"]["metricsPort"] = free_port()
    side_dir = workdir / "voicefleet"
    side_dir.mkdir(parents=True, exist_ok=True)
    config_path = side_dir / "runtime-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    turn = plan_turn_detection(RuntimeConfig.model_validate(config).pipeline).effective
    env = {
        "VOICEFLEET_CONFIG": str(config_path),
        "PROMETHEUS_MULTIPROC_DIR": str(side_dir / "metrics"),
        **livekit_env(livekit),
        **PROVIDER_KEYS,
    }
    argv = [sys.executable, "-m", "voicefleet_runtime", "start"]
    return WorkerProcess("voicefleet", argv, env, side_dir), str(config["dispatchName"]), turn


PROVIDER_KEYS = {"OPENAI_API_KEY": "bench", "DEEPGRAM_API_KEY": "bench", "ELEVEN_API_KEY": "bench"}


def livekit_env(livekit: LiveKitEndpoint) -> dict[str, str]:
    return {
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
    }


def baseline_worker(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    provider_path: str,
    workdir: Path,
    idle_processes: int,
    turn_detection: str,
) -> tuple[WorkerProcess, str]:
    name = f"bench-baseline-{secrets.token_hex(3)}"
    env = {
        **livekit_env(livekit),
        **PROVIDER_KEYS,
        "AGENT_NAME": name,
        "PROVIDERS": provider_path,
        "TURN_DETECTION": turn_detection,
        "OPENAI_BASE_URL": providers.base_url,
        "DEEPGRAM_BASE_URL": providers.deepgram_url,
        "ELEVENLABS_BASE_URL": providers.elevenlabs_base_url,
        "IDLE_PROCESSES": str(idle_processes),
        "JOBS_PER_WORKER": str(JOBS_PER_WORKER),
        "HEALTH_PORT": str(free_port()),
    }
    argv = [sys.executable, "-m", "voicefleet_localdev.bench.baseline_agent", "start"]
    return WorkerProcess("baseline", argv, env, workdir / "baseline"), name


# --- what a worker costs -----------------------------------------------------------------------


def tree(worker: WorkerProcess) -> list[psutil.Process]:
    assert worker.process is not None
    main = psutil.Process(worker.process.pid)
    return [main, *main.children(recursive=True)]


def pss_mb(worker: WorkerProcess) -> float:
    total = 0
    for process in tree(worker):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_full_info().pss
    return total / MB


def cpu_seconds(worker: WorkerProcess) -> float:
    """CPU of the worker's processes, with their reaped children's (ended job processes)."""
    total = 0.0
    for process in tree(worker):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


async def wait_processes(worker: WorkerProcess, count: int, timeout_s: float = 30.0) -> None:
    """Until the worker runs `count` processes again (its job processes have exited); goes on
    after `timeout_s` (a job process slow to exit costs the next figure, not the run)."""
    with contextlib.suppress(WaitTimeout):
        await wait_until(
            f"{worker.label}: back to {count} processes",
            lambda: len(tree(worker)) <= count,
            within=timeout_s,
            describe=lambda: f"{len(tree(worker))} processes",
        )


# --- calls -------------------------------------------------------------------------------------


@dataclass
class Call:
    side: str
    dispatched_at: float
    joined_s: float | None = None
    greeting_s: float | None = None
    turns_s: list[float] = field(default_factory=list)
    ended_at: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended_at or time.monotonic()) - self.dispatched_at


async def scripted_call(
    livekit: LiveKitEndpoint,
    side: str,
    dispatch_name: str,
    phrases: list[PcmAudio],
    *,
    scripted: asyncio.Event | None = None,
    hang_up: asyncio.Event | None = None,
) -> Call:
    """One call: join, greeting, the caller's turns; with `hang_up`, stay on the line (silent)
    until it is set, after setting `scripted`."""
    room = f"bench-{side}-{secrets.token_hex(4)}"
    token = participant_token(
        livekit.api_key, livekit.api_secret, room, identity="caller", dispatch_agent=dispatch_name
    )
    caller = TestParticipant(livekit.url, token)
    call = Call(side, time.monotonic())
    try:
        await caller.join()
        agent = (await caller.wait_for_participant(timeout_s=WAIT_S)).identity
        call.joined_s = time.monotonic() - call.dispatched_at
        greeting_at = await caller.wait_for_audio(agent, timeout_s=WAIT_S)
        call.greeting_s = greeting_at - call.dispatched_at
        await caller.wait_for_speech_end(agent, after=greeting_at, quiet_s=QUIET_S)
        for audio in phrases:
            phrase = await caller.play(audio, label="caller turn")
            reply_at = await caller.wait_for_audio(agent, after=phrase.ended_at, timeout_s=WAIT_S)
            call.turns_s.append(reply_at - phrase.ended_at)
            await caller.wait_for_speech_end(agent, after=reply_at, quiet_s=QUIET_S)
    except ParticipantError as error:
        call.error = str(error).splitlines()[0][:300]
    finally:
        if scripted is not None:
            scripted.set()
        if hang_up is not None and call.error is None:
            await hang_up.wait()
        call.ended_at = time.monotonic()
        await caller.leave()
    return call


@dataclass
class Side:
    name: str
    worker: WorkerProcess
    dispatch_name: str
    idle_process_count: int = 0
    calls: list[Call] = field(default_factory=list)
    idle_pss_mb: list[float] = field(default_factory=list)
    per_call_pss_mb: list[float] = field(default_factory=list)
    cpu_per_call_minute: list[float] = field(default_factory=list)
    idle_cpu_per_minute: float = 0.0
    """CPU seconds a minute the idle worker spends (heartbeats, idle processes, our servers)."""
    ramp_turns: dict[int, list[float]] = field(default_factory=dict)
    ramp_failures: dict[int, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        single = [c for c in self.calls if c.error is None]
        return {
            "dispatch_to_joined_s": stats.summary(c.joined_s for c in single if c.joined_s),
            "dispatch_to_greeting_s": stats.summary(c.greeting_s for c in single if c.greeting_s),
            "turn_latency_s": stats.summary(t for c in single for t in c.turns_s),
            "idle_pss_mb": stats.summary(self.idle_pss_mb, 1),
            "per_call_pss_mb": stats.summary(self.per_call_pss_mb, 1),
            "cpu_s_per_call_minute": stats.summary(self.cpu_per_call_minute, 2),
            "idle_cpu_s_per_minute": round(self.idle_cpu_per_minute, 3),
            "calls": len(self.calls),
            "failed_calls": [c.error for c in self.calls if c.error],
            "ramp_failed_calls": {str(k): v for k, v in self.ramp_failures.items() if v},
        }


async def single_call(side: Side, livekit: LiveKitEndpoint, phrases: list[PcmAudio]) -> Call:
    """A call on its own, with the CPU the worker spent on it."""
    await wait_processes(side.worker, side.idle_process_count)
    before, started = cpu_seconds(side.worker), time.monotonic()
    call = await scripted_call(livekit, side.name, side.dispatch_name, phrases)
    await wait_processes(side.worker, side.idle_process_count)
    await asyncio.sleep(0.5)  # the replacement idle process finishes its prewarm
    # What the call added: the worker's CPU until its job process was gone, less what the idle
    # worker spends in that time (the baseline's job stays ~20 s after the caller hangs up,
    # until livekit-server closes the empty room; VoiceFleet's ends with the session).
    window = time.monotonic() - started
    spent = cpu_seconds(side.worker) - before - side.idle_cpu_per_minute * window / 60
    if call.error is None:
        per_minute = stats.cpu_per_call_minute(spent, call.seconds)
        if per_minute is not None:
            side.cpu_per_call_minute.append(per_minute)
    side.calls.append(call)
    return call


async def ramp_level(side: Side, livekit: LiveKitEndpoint, phrases: list[PcmAudio], n: int) -> str:
    """`n` calls at once; PSS read while all of them are on the line."""
    await wait_processes(side.worker, side.idle_process_count)
    await asyncio.sleep(SETTLE_S)
    idle = pss_mb(side.worker)
    side.idle_pss_mb.append(idle)
    hang_up = asyncio.Event()
    scripted = [asyncio.Event() for _ in range(n)]
    tasks = [
        asyncio.ensure_future(
            scripted_call(
                livekit, side.name, side.dispatch_name, phrases, scripted=s, hang_up=hang_up
            )
        )
        for s in scripted
    ]
    await asyncio.gather(*(s.wait() for s in scripted))
    await asyncio.sleep(1.0)
    active = pss_mb(side.worker)
    hang_up.set()
    calls = await asyncio.gather(*tasks)
    ok = [c for c in calls if c.error is None]
    side.ramp_failures[n] = len(calls) - len(ok)
    if ok:
        side.per_call_pss_mb.append(stats.per_call(active, idle, len(ok)))
    side.ramp_turns[n] = [t for c in ok for t in c.turns_s] if len(ok) == n else []
    turns = stats.summary(side.ramp_turns[n])
    return (
        f"{side.name} x{n}: turn p50 {turns['p50']} p95 {turns['p95']}, "
        f"PSS {idle:.0f} -> {active:.0f} MB, failed {side.ramp_failures[n]}"
    )


# --- the run -----------------------------------------------------------------------------------


async def run(
    workdir: Path,
    *,
    calls: int,
    ramp: list[int],
    idle_processes: int,
    provider_path: str,
    report: Report,
) -> dict[str, Any]:
    livekit = LiveKitEndpoint()
    load_before = os.getloadavg()
    phrases = [await synthesize(text, sample_rate=48000) for text in CALLER_TURNS]
    async with ProviderServer() as providers:
        providers.script_llm(LLMReply(text=REPLY, after="user", repeat=True))
        ours_worker, ours_name, turn = voicefleet_worker(
            livekit, providers, provider_path, workdir, idle_processes
        )
        base_worker, base_name = baseline_worker(
            livekit, providers, provider_path, workdir, idle_processes, turn
        )
        sides = [
            Side("voicefleet", ours_worker, ours_name),
            Side("baseline", base_worker, base_name),
        ]
        report(f"providers {provider_path}, turn detection {turn} (both sides)")
        try:
            for side in sides:
                side.worker.start()
            for side in sides:
                registered = await side.worker.wait_registered()
                report(f"{side.name}: registered in {registered:.1f}s")
            await asyncio.sleep(SETTLE_S * 3)  # the idle processes finish their prewarm
            for side in sides:
                side.idle_process_count = len(tree(side.worker))
            idle_cpu = [cpu_seconds(side.worker) for side in sides]
            idle_from = time.monotonic()
            for _ in range(IDLE_READINGS):
                for side in sides:
                    side.idle_pss_mb.append(pss_mb(side.worker))
                await asyncio.sleep(IDLE_CPU_S / IDLE_READINGS)
            for side, before in zip(sides, idle_cpu, strict=True):
                minutes = (time.monotonic() - idle_from) / 60
                side.idle_cpu_per_minute = (cpu_seconds(side.worker) - before) / minutes
            for side in sides:
                report(
                    f"{side.name}: idle {side.idle_process_count} processes, PSS "
                    f"{[round(v) for v in side.idle_pss_mb]} MB, CPU "
                    f"{side.idle_cpu_per_minute:.2f}s/min"
                )
            for i in range(calls):
                for side in sides if i % 2 == 0 else sides[::-1]:
                    call = await single_call(side, livekit, phrases)
                    report(
                        f"{side.name} call {i + 1}/{calls}: "
                        + (
                            f"joined {call.joined_s:.2f}s, greeting {call.greeting_s:.2f}s, "
                            f"turns {[round(t, 2) for t in call.turns_s]}, "
                            f"CPU {side.cpu_per_call_minute[-1]:.2f}s/call-min"
                            if call.error is None
                            else f"FAILED {call.error}"
                        )
                    )
            for j, level in enumerate(ramp):
                for side in sides if j % 2 == 0 else sides[::-1]:
                    report(await ramp_level(side, livekit, phrases, level))
        finally:
            for side in sides:
                side.worker.stop()
    return result(sides, calls, ramp, idle_processes, provider_path, turn, load_before)


def result(
    sides: list[Side],
    calls: int,
    ramp: list[int],
    idle_processes: int,
    provider_path: str,
    turn: str,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    ours, base = (side.figures() for side in sides)
    cores = psutil.cpu_count() or 1
    per_core = {}
    for side, figures in zip(sides, (ours, base), strict=True):
        p95_by_level = {
            level: stats.summary(turns)["p95"] for level, turns in side.ramp_turns.items()
        }
        per_core[side.name] = stats.calls_per_core(
            figures["turn_latency_s"]["p95"], p95_by_level, cores
        )
    found = stats.ratios(ours, base)
    found["calls_per_core"] = stats.ratio(
        per_core["voicefleet"]["calls_per_core"], per_core["baseline"]["calls_per_core"]
    )
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": cores,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "calls_per_side": calls,
            "ramp": ramp,
            "idle_processes": idle_processes,
            "providers": provider_path,
            "turn_detection": turn,
            "caller_turns": list(CALLER_TURNS),
            "latency_headroom": stats.LATENCY_HEADROOM,
        },
        "voicefleet": ours,
        "baseline": base,
        "ratios": found,
        "calls_per_core": per_core,
    }


def check_provider_path(value: str) -> str:
    if value not in PROVIDER_PATHS:
        raise BenchError(f"--providers must be one of {', '.join(PROVIDER_PATHS)}, not {value!r}")
    return value
