"""Worker benchmarks: memory per idle worker and per active call, and dispatch-to-greeting latency.

Two workers run as host processes against the same livekit-server, side by side with the same
process model (main process, forkserver, warm idle job processes):

  runtime   `python -m voicefleet_runtime start` with the config the operator renders from
            examples/voiceagent.yaml (providers pointed at the local provider server);
  baseline  a bare livekit-agents AgentServer whose jobs join the room and do nothing
            (voicefleet_localdev/bench/bare_agent.py).

Memory is PSS (proportional set size: shared pages split between the processes sharing them),
summed over each worker's process tree; job processes are forked from a forkserver, so their RSS
counts the same libraries and models many times over. RSS of the main process is given as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from voicefleet_testkit.net import free_port
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer

from voicefleet_localdev import paths
from voicefleet_localdev.livekit import LiveKitEndpoint

EXAMPLE = paths.REPO_ROOT / "examples" / "voiceagent.yaml"
REGISTER_TIMEOUT_S = 120.0
SETTLE_S = 4.0  # after a change, before reading memory (idle processes respawn, GC settles)
MB = 2**20


class BenchError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    """One worker as a host process, its log in the bench directory."""

    label: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{text}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    async def wait_registered(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < REGISTER_TIMEOUT_S:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.label} worker exited ({self.process.returncode}) before registering\n"
                    + self.tail()
                )
            if "registered worker" in self.log():
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        raise BenchError(f"{self.label} worker did not register\n{self.tail()}")

    def memory(self) -> dict[str, Any]:
        """PSS of the whole process tree, RSS of the main process, and the number of processes."""
        assert self.process is not None
        main = psutil.Process(self.process.pid)
        tree = [main, *main.children(recursive=True)]
        pss = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                pss += process.memory_full_info().pss
        return {
            "pss_total_mb": round(pss / MB, 1),
            "main_rss_mb": round(main.memory_info().rss / MB, 1),
            "processes": len(tree),
        }

    def stop(self, timeout_s: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def runtime_worker(
    livekit: LiveKitEndpoint, providers: ProviderServer, workdir: Path, idle_processes: int
) -> tuple[WorkerProcess, str]:
    """The runtime with the config the operator renders from the example VoiceAgent."""
    from voicefleet_operator.api import VoiceAgentSpec
    from voicefleet_operator.render import VoiceAgentRef, header_env_var, runtime_config

    example = yaml.safe_load(EXAMPLE.read_text())
    spec = example["spec"]
    spec["pipeline"]["stt"]["baseUrl"] = providers.url
    spec["pipeline"]["llm"]["baseUrl"] = providers.base_url
    spec["pipeline"]["tts"]["baseUrl"] = providers.elevenlabs_base_url
    spec["worker"]["idleProcesses"] = idle_processes
    ref = VoiceAgentRef(example["metadata"]["name"], f"bench-{secrets.token_hex(3)}", "bench")
    config = runtime_config(ref, VoiceAgentSpec.model_validate(spec)).model_dump(
        by_alias=True, mode="json", exclude_none=True
    )
    config["worker"]["healthPort"] = free_port()
    config["worker"]["metricsPort"] = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "runtime-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        "VOICEFLEET_CONFIG": str(config_path),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "OPENAI_API_KEY": "bench",
        "DEEPGRAM_API_KEY": "bench",
        "ELEVEN_API_KEY": "bench",
    }
    for tool in spec.get("tools", []):
        for header in tool["http"].get("headers", []):
            secret = (header.get("valueFrom") or {}).get("secretKeyRef")
            if secret:
                env[header_env_var(secret["name"], secret["key"])] = "Bearer bench"
    argv = [sys.executable, "-m", "voicefleet_runtime", "start"]
    return WorkerProcess("runtime", argv, env, workdir), str(config["dispatchName"])


def bare_worker(livekit: LiveKitEndpoint, workdir: Path, idle_processes: int) -> tuple[
    WorkerProcess, str
]:  # fmt: skip
    name = f"bench-bare-{secrets.token_hex(3)}"
    argv = [
        sys.executable, "-m", "voicefleet_localdev.bench.bare_agent", "--agent-name", name,
        "--idle-processes", str(idle_processes), "--port", str(free_port()), "start",
    ]  # fmt: skip
    env = {
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
    }
    return WorkerProcess("baseline", argv, env, workdir), name


# --- calls -----------------------------------------------------------------------------------


@dataclass
class HeldCall:
    caller: TestParticipant
    dispatched_at: float
    joined_s: float | None = None
    greeting_s: float | None = None


async def place_call(
    livekit: LiveKitEndpoint, dispatch_name: str, *, wait_greeting: bool
) -> HeldCall:
    room = f"bench-{secrets.token_hex(4)}"
    token = participant_token(
        livekit.api_key, livekit.api_secret, room, identity="bench-caller",
        dispatch_agent=dispatch_name,
    )  # fmt: skip
    caller = TestParticipant(livekit.url, token)
    call = HeldCall(caller, time.monotonic())
    await caller.join()
    agent = await caller.wait_for_participant(timeout_s=60)
    call.joined_s = time.monotonic() - call.dispatched_at
    if wait_greeting:
        greeting = await caller.wait_for_audio(agent.identity, timeout_s=60)
        call.greeting_s = greeting - call.dispatched_at
    return call


async def hang_up(calls: list[HeldCall]) -> None:
    for call in calls:
        await call.caller.leave()


async def tts_baseline(providers: ProviderServer, text: str, runs: int) -> dict[str, float]:
    """The provider server's own TTS time for the greeting: time to the first audio byte and to
    the last, over HTTP from this process (no LiveKit, no agent)."""
    firsts, totals = [], []
    url = f"{providers.elevenlabs_base_url}/text-to-speech/bench-voice/stream"
    async with aiohttp.ClientSession(headers={"xi-api-key": "bench"}) as session:
        for _ in range(runs):
            started = time.monotonic()
            first = None
            async with session.post(
                url, json={"text": text, "model_id": "eleven_flash_v2_5"},
                params={"output_format": "pcm_24000"},
            ) as response:  # fmt: skip
                if response.status != 200:
                    raise BenchError(f"TTS baseline: {url} -> {response.status}")
                async for chunk in response.content.iter_any():
                    if chunk and first is None:
                        first = time.monotonic() - started
            totals.append(time.monotonic() - started)
            firsts.append(first or totals[-1])
    return {
        "tts_first_byte_s": round(statistics.median(firsts), 3),
        "tts_total_s": round(statistics.median(totals), 3),
    }


@dataclass
class WorkerFigures:
    idle: dict[str, Any] = field(default_factory=dict)
    active: dict[str, Any] = field(default_factory=dict)
    per_call_pss_mb: float = 0.0
    register_s: float = 0.0
    dispatch_to_joined_s: list[float] = field(default_factory=list)
    dispatch_to_greeting_s: list[float] = field(default_factory=list)


async def measure_worker(
    worker: WorkerProcess,
    livekit: LiveKitEndpoint,
    dispatch_name: str,
    *,
    calls: int,
    latency_calls: int,
    greets: bool,
    report: Any,
) -> WorkerFigures:
    figures = WorkerFigures()
    worker.start()
    try:
        figures.register_s = round(await worker.wait_registered(), 2)
        await asyncio.sleep(SETTLE_S * 2)  # idle processes warm up
        figures.idle = worker.memory()
        report(f"{worker.label}: registered in {figures.register_s}s; idle {figures.idle}")
        # Latency: calls one at a time, each on a warm idle process.
        for _ in range(latency_calls):
            call = await place_call(livekit, dispatch_name, wait_greeting=greets)
            assert call.joined_s is not None
            figures.dispatch_to_joined_s.append(round(call.joined_s, 3))
            if call.greeting_s is not None:
                figures.dispatch_to_greeting_s.append(round(call.greeting_s, 3))
            await hang_up([call])
            await asyncio.sleep(SETTLE_S)
        report(
            f"{worker.label}: dispatch->joined {figures.dispatch_to_joined_s}, "
            f"dispatch->greeting {figures.dispatch_to_greeting_s}"
        )
        # Memory with `calls` calls held at once.
        held = []
        try:
            for _ in range(calls):
                held.append(await place_call(livekit, dispatch_name, wait_greeting=greets))
            await asyncio.sleep(SETTLE_S * 2)
            figures.active = worker.memory()
        finally:
            await hang_up(held)
        figures.per_call_pss_mb = round(
            (figures.active["pss_total_mb"] - figures.idle["pss_total_mb"]) / calls, 1
        )
        report(f"{worker.label}: {calls} calls {figures.active}")
    finally:
        worker.stop()
    return figures


def ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 2) if baseline else None


async def run(
    workdir: Path, *, calls: int, latency_calls: int, idle_processes: int, report: Any
) -> dict[str, Any]:
    livekit = LiveKitEndpoint()
    async with ProviderServer() as providers:
        providers.script_llm(LLMReply(text="Thanks, one moment.", after="user", repeat=True))
        runtime, runtime_name = runtime_worker(livekit, providers, workdir, idle_processes)
        bare, bare_name = bare_worker(livekit, workdir, idle_processes)
        greeting = yaml.safe_load(EXAMPLE.read_text())["spec"]["agents"][0]["greeting"]
        tts = await tts_baseline(providers, greeting, runs=3)
        report(f"provider TTS for the greeting: {tts}")
        base = await measure_worker(
            bare, livekit, bare_name, calls=calls, latency_calls=latency_calls,
            greets=False, report=report,
        )  # fmt: skip
        ours = await measure_worker(
            runtime, livekit, runtime_name, calls=calls, latency_calls=latency_calls,
            greets=True, report=report,
        )  # fmt: skip
        tts_requests = providers.requests("tts")
    greeting_median = statistics.median(ours.dispatch_to_greeting_s)
    return {
        "settings": {
            "active_calls": calls,
            "latency_calls": latency_calls,
            "idle_processes": idle_processes,
        },
        "memory": {
            "runtime": {
                "idle": ours.idle,
                "active": ours.active,
                "per_call_pss_mb": (ours.per_call_pss_mb),
            },
            "baseline_bare_agentserver": {
                "idle": base.idle,
                "active": base.active,
                "per_call_pss_mb": base.per_call_pss_mb,
            },
            "idle_worker_pss_ratio": ratio(ours.idle["pss_total_mb"], base.idle["pss_total_mb"]),
            "idle_main_rss_ratio": ratio(ours.idle["main_rss_mb"], base.idle["main_rss_mb"]),
            "per_call_pss_ratio": ratio(ours.per_call_pss_mb, base.per_call_pss_mb),
        },
        "latency": {
            "runtime_dispatch_to_greeting_s": ours.dispatch_to_greeting_s,
            "runtime_dispatch_to_greeting_median_s": round(greeting_median, 3),
            "runtime_dispatch_to_joined_s": ours.dispatch_to_joined_s,
            "baseline_dispatch_to_joined_s": base.dispatch_to_joined_s,
            "baseline_provider_tts": tts,
            "greeting_vs_tts_first_byte_ratio": ratio(greeting_median, tts["tts_first_byte_s"]),
            "greeting_vs_tts_total_ratio": ratio(greeting_median, tts["tts_total_s"]),
            "joined_vs_bare_joined_ratio": ratio(
                statistics.median(ours.dispatch_to_joined_s),
                statistics.median(base.dispatch_to_joined_s),
            ),
            "tts_requests_served": len(tts_requests),
        },
        "register_s": {"runtime": ours.register_s, "baseline": base.register_s},
    }
