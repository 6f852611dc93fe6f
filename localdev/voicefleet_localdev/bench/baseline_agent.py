"""The baseline of `make bench`: the voice agent a team writes without VoiceFleet.

Plain livekit-agents, written the way the framework's own examples write the minimal agent: an
AgentServer with an `rtc_session` under an agent name, `prewarm` loading Silero VAD into each job
process, and an AgentSession with the same STT/LLM/TTS plugins, models and options as the
VoiceAgent the bench runs on VoiceFleet, the same instructions and the same greeting. Nothing of
VoiceFleet is imported (tests/unit/test_bench.py checks the imports), so what it costs is what
livekit-agents itself costs; the bench runs it beside the VoiceFleet runtime.

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
    OPENAI_API_KEY=... DEEPGRAM_API_KEY=... ELEVEN_API_KEY=... \\
    OPENAI_BASE_URL=http://127.0.0.1:8300/v1 DEEPGRAM_BASE_URL=http://127.0.0.1:8300/v1/listen \\
    ELEVENLABS_BASE_URL=http://127.0.0.1:8300/v1 \\
    python -m voicefleet_localdev.bench.baseline_agent start

Environment, besides LiveKit's and the providers' keys:
  AGENT_NAME           dispatch name (default bench-baseline)
  PROVIDERS            deepgram-elevenlabs (Deepgram STT, ElevenLabs TTS; default) or openai
                       (OpenAI STT and TTS): the bench runs each provider path once
  TURN_DETECTION       vad (default) or multilingual: what the VoiceFleet worker under test runs
                       (it falls back to vad when the turn-detector model files are missing)
  *_BASE_URL           the provider endpoints (the bench's local provider servers)
  IDLE_PROCESSES, JOBS_PER_WORKER, HEALTH_PORT   the worker options the VoiceAgent sets

Where it departs from a copy-paste of the example, it does so to match the VoiceAgent under
test, never to make itself cheaper: the same number of warm idle processes, a load counted in
jobs (jobsPerWorker) rather than the machine's CPU (which on a shared 2-core box marks a worker
full before its first call), VAD interruptions (adaptive ones need LiveKit Cloud) and no
preemptive generation (the VoiceAgent's default).
"""

from __future__ import annotations

import os
from typing import Any

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import deepgram, elevenlabs, openai, silero

# The same words as the VoiceAgent under test (the bench builds its spec from these).
INSTRUCTIONS = (
    "You are the friendly receptionist of Acme. Keep answers short: this is a phone call."
)
GREETING = "Thanks for calling Acme, how can I help?"

STT_MODEL = {"deepgram-elevenlabs": "nova-3", "openai": "gpt-4o-mini-transcribe"}
LLM_MODEL = "gpt-4o-mini"
TTS_MODEL = {"deepgram-elevenlabs": "eleven_flash_v2_5", "openai": "gpt-4o-mini-tts"}
LANGUAGE = "en"


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


class Receptionist(Agent):
    def __init__(self) -> None:
        super().__init__(instructions=INSTRUCTIONS)

    async def on_enter(self) -> None:
        self.session.say(GREETING)


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


def plugins(providers: str) -> dict[str, Any]:
    """STT, LLM and TTS for one provider path, at the configured endpoints."""
    llm = openai.LLM(model=LLM_MODEL, base_url=env("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    if providers == "openai":
        base_url = env("OPENAI_BASE_URL", "https://api.openai.com/v1")
        return {
            "stt": openai.STT(model=STT_MODEL[providers], language=LANGUAGE, base_url=base_url),
            "llm": llm,
            "tts": openai.TTS(model=TTS_MODEL[providers], base_url=base_url),
        }
    return {
        "stt": deepgram.STT(
            model=STT_MODEL[providers],
            language=LANGUAGE,
            base_url=env("DEEPGRAM_BASE_URL", "https://api.deepgram.com/v1/listen"),
        ),
        "llm": llm,
        "tts": elevenlabs.TTS(
            model=TTS_MODEL[providers],
            base_url=env("ELEVENLABS_BASE_URL", "https://api.elevenlabs.io/v1"),
        ),
    }


def turn_detection() -> Any:
    if env("TURN_DETECTION", "vad") == "multilingual":
        from livekit.plugins.turn_detector.multilingual import MultilingualModel

        return MultilingualModel()
    return "vad"


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession(
        **plugins(env("PROVIDERS", "deepgram-elevenlabs")),
        vad=ctx.proc.userdata["vad"],
        turn_handling={
            "turn_detection": turn_detection(),
            "interruption": {"mode": "vad"},
            "preemptive_generation": {"enabled": False},
        },
    )
    await session.start(agent=Receptionist(), room=ctx.room)


jobs_per_worker = int(env("JOBS_PER_WORKER", "10"))
server = AgentServer(
    num_idle_processes=int(env("IDLE_PROCESSES", "2")),
    port=int(env("HEALTH_PORT", "8081")),
    load_fnc=lambda worker: len(worker.active_jobs) / jobs_per_worker,
)
server.setup_fnc = prewarm
server.rtc_session(entrypoint, agent_name=env("AGENT_NAME", "bench-baseline"))


if __name__ == "__main__":
    cli.run_app(server)
