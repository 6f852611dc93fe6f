"""The runtime against a real livekit-server: workers as real processes (`python -m
voicefleet_runtime start`), a test caller using the livekit rtc SDK, the local OpenAI-compatible
provider server (real openai plugins over HTTP) and a local webhook server.

One worker serves the conversation tests (a new room each); the capacity test runs two workers
of its own. Measured figures (dispatch-to-greeting, memory) are printed and attached to the
test report as properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from livekit import api
from prometheus_client.parser import text_string_to_metric_families
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_runtime.admission import DEFAULT_OVERFLOW_MESSAGE, REPORT_PATH, WorkerReport
from voicefleet_testkit.net import free_port
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall
from voicefleet_testkit.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ORDERS_TOKEN = "orders-token-" + uuid.uuid4().hex[:8]
GREETING = "Hello, thanks for calling Acme. How can I help?"
BILLING_INSTRUCTIONS = "You are the billing agent of Acme. Answer invoice questions briefly."
# livekit-agents' warning after each failed attempt to reach livekit-server.
CONNECT_FAILED = "failed to connect to livekit, retrying"
# Preloading plugins in the forkserver is slow on a loaded 2-core machine.
REGISTER_TIMEOUT_S = 180.0


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# --- a worker process -----------------------------------------------------------------------


class RuntimeWorker:
    """`python -m voicefleet_runtime start` with a config file, as the pod runs it."""

    def __init__(self, livekit: LiveKitEndpoint, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "worker.log"
        self.health_port = config["worker"]["healthPort"]
        self.metrics_port = config["worker"]["metricsPort"]
        self.env = {
            **os.environ,
            "VOICEFLEET_CONFIG": str(self.config_path),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
            "LIVEKIT_URL": livekit.url,
            "LIVEKIT_API_KEY": livekit.api_key,
            "LIVEKIT_API_SECRET": livekit.api_secret,
            "OPENAI_API_KEY": "sk-test-runtime",
            "ORDERS_TOKEN": ORDERS_TOKEN,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "voicefleet_runtime", "start"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n{self.log_tail()}", pytrace=False)

    async def wait_registered(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < REGISTER_TIMEOUT_S:
            assert self.process is not None
            if self.process.poll() is not None:
                self.fail(f"worker exited with {self.process.returncode} before registering")
            if '"registered worker"' in self.log():
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        self.fail(f"worker did not register with LiveKit within {REGISTER_TIMEOUT_S}s")
        return 0.0

    def status(self) -> dict[str, Any]:
        """The worker's /worker document; protobuf JSON leaves out zero values, put them back."""
        code, body = http_get(f"http://127.0.0.1:{self.health_port}/worker")
        assert code == 200, body
        return {"active_jobs": 0, "worker_load": 0.0, **json.loads(body)}

    def report(self) -> WorkerReport:
        """The worker's own report (GET /report), what the operator reads."""
        code, body = http_get(f"http://127.0.0.1:{self.metrics_port}{REPORT_PATH}")
        assert code == 200, body
        return WorkerReport.model_validate_json(body)

    def readiness(self) -> tuple[int, str]:
        """The readiness probe's answer: (HTTP status, reason)."""
        return http_get(f"http://127.0.0.1:{self.metrics_port}/ready")

    def metrics(self) -> str:
        code, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        assert code == 200, body
        return body

    def processes(self) -> tuple[psutil.Process, list[psutil.Process]]:
        assert self.process is not None
        main = psutil.Process(self.process.pid)
        return main, main.children(recursive=True)

    async def stop(self, timeout_s: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.process.wait, timeout_s)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.fail(f"worker did not exit within {timeout_s}s of SIGTERM")
        return self.process.returncode


@contextlib.asynccontextmanager
async def running_worker(
    livekit: LiveKitEndpoint, config: dict[str, Any], workdir: Path
) -> AsyncIterator[RuntimeWorker]:
    worker = RuntimeWorker(livekit, config, workdir)
    worker.start()
    try:
        await worker.wait_registered()
        yield worker
    finally:
        await worker.stop()


def runtime_config(
    dispatch_name: str, provider_url: str, webhook_url: str, **worker: Any
) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "name": "support",
        "dispatchName": dispatch_name,
        "agents": [
            {
                "name": "receptionist",
                "instructions": "You are the receptionist of Acme. The caller is {caller_number}.",
                "greeting": GREETING,
                "tools": ["lookup_order", "broken_lookup"],
                "handoffs": ["billing"],
            },
            {"name": "billing", "instructions": BILLING_INSTRUCTIONS},
        ],
        "entry": "receptionist",
        "pipeline": {
            "stt": {"provider": "openai", "model": "whisper-1", "baseUrl": provider_url},
            "llm": {"provider": "openai", "model": "gpt-4o-mini", "baseUrl": provider_url},
            "tts": {"provider": "openai", "voice": "alloy", "baseUrl": provider_url},
            # No model files on this machine: exercises the fallback to VAD.
            "turnDetection": {"mode": "english"},
        },
        "tools": [
            {
                "name": "lookup_order",
                "description": "Look up an order's delivery status by its order id.",
                "parameters": {
                    "type": "object",
                    "properties": {"order_id": {"type": "string", "description": "Order id"}},
                    "required": ["order_id"],
                },
                "http": {
                    "url": f"{webhook_url}/orders",
                    "timeoutSeconds": 5,
                    "headers": [{"name": "Authorization", "valueFromEnv": "ORDERS_TOKEN"}],
                },
            },
            {
                "name": "broken_lookup",
                "description": "Look up a parcel (this service is down).",
                "parameters": {
                    "type": "object",
                    "properties": {"parcel": {"type": "string"}},
                },
                "http": {"url": f"{webhook_url}/broken", "timeoutSeconds": 5},
            },
        ],
        "worker": {
            "jobsPerWorker": 3,
            "idleProcesses": 1,
            "healthPort": free_port(),
            "metricsPort": free_port(),
            "drainTimeoutSeconds": 60,
            **worker,
        },
    }


# --- the webhook --------------------------------------------------------------------------


class Webhooks:
    """The tenant's webhook server: records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_post("/orders", self._orders)
        self.app.router.add_post("/broken", self._broken)
        self.runner = web.AppRunner(self.app)
        self.url = ""

    async def _orders(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append({"path": "/orders", "body": body, "headers": dict(request.headers)})
        return web.json_response({"order_id": body.get("order_id"), "status": "shipped"})

    async def _broken(self, request: web.Request) -> web.Response:
        self.calls.append({"path": "/broken", "body": await request.json()})
        return web.json_response({"error": "database down"}, status=500)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


# --- fixtures -----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_providers() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(
    livekit: LiveKitEndpoint,
    module_providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RuntimeWorker]:
    dispatch_name = f"acme-support-{uuid.uuid4().hex[:6]}"
    config = runtime_config(dispatch_name, module_providers.base_url, webhooks.url)
    async with running_worker(livekit, config, tmp_path_factory.mktemp("worker")) as running:
        yield running


@pytest.fixture
def fresh_providers(module_providers: ProviderServer) -> ProviderServer:
    module_providers.reset()
    return module_providers


class Call:
    """A dispatched call: the room, the caller, and when the dispatch was made."""

    def __init__(self, caller: TestParticipant, room: str, dispatched_at: float) -> None:
        self.caller = caller
        self.room = room
        self.dispatched_at = dispatched_at
        self.agent_identity = ""
        self.greeting_at = 0.0

    async def wait_for_greeting(self) -> float:
        agent = await self.caller.wait_for_participant(agent=True, timeout_s=30)
        self.agent_identity = agent.identity
        self.greeting_at = await self.caller.wait_for_audio(agent.identity, timeout_s=30)
        await self.caller.wait_for_speech_end(agent.identity, after=self.greeting_at - 0.1)
        return self.greeting_at - self.dispatched_at

    async def ask(self, question: str) -> float:
        """Say `question`, wait for the agent's whole reply; returns the reply's start time."""
        phrase = await self.caller.say(question)
        reply_at = await self.caller.wait_for_audio(
            self.agent_identity, after=phrase.ended_at, timeout_s=30
        )
        await self.caller.wait_for_speech_end(self.agent_identity, after=reply_at - 0.1)
        return reply_at


@contextlib.asynccontextmanager
async def dispatched_call(
    livekit: LiveKitEndpoint, dispatch_name: str, attributes: dict[str, str] | None = None
) -> AsyncIterator[Call]:
    room = f"runtime-{uuid.uuid4().hex[:8]}"
    async with livekit.api() as lkapi:
        dispatched_at = time.monotonic()
        await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=dispatch_name, room=room)
        )
    token = participant_token(
        livekit.api_key, livekit.api_secret, room, "caller", attributes=attributes
    )
    async with TestParticipant(livekit.url, token) as caller:
        yield Call(caller, room, dispatched_at)


async def dispatch_at_once(lkapi: api.LiveKitAPI, dispatch_name: str, rooms: list[str]) -> None:
    """One dispatch per room, all sent together (they reach the workers inside one load report)."""
    await asyncio.gather(
        *(
            lkapi.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=dispatch_name, room=room)
            )
            for room in rooms
        )
    )


def spoken(providers: ProviderServer) -> str:
    """Everything sent to TTS for calls, in order (livekit-agents sends one request per
    sentence). A worker also synthesises its overflow message once when it starts, so that a
    caller beyond capacity hears it at once; that request is no call's speech and is left out."""
    return " ".join(
        str(request["text"])
        for request in providers.requests("tts")
        if request["text"] != DEFAULT_OVERFLOW_MESSAGE
    )


def chat_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return list(request["body"]["messages"])


def tool_names(request: dict[str, Any]) -> set[str]:
    return {tool["function"]["name"] for tool in request["body"].get("tools", [])}


def sample_values(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one series name from Prometheus text: [(labels, value)]."""
    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name
    ]


def worker_memory(main: psutil.Process) -> list[dict[str, Any]]:
    """RSS and USS per process of a worker. USS is memory only that process holds: job
    processes share the forkserver's pages copy-on-write, so their RSS counts shared libraries
    and models many times over."""
    rows = []
    for process in [main, *main.children(recursive=True)]:
        if process.pid == main.pid:
            role = "main"
        elif "resource_tracker" in " ".join(process.cmdline()):
            role = "resource_tracker"
        elif process.children():
            role = "forkserver"  # job processes are forked from it, with its command line
        else:
            role = "job process"
        info = process.memory_full_info()
        rows.append(
            {"role": role, "rss_mb": round(info.rss / 2**20), "uss_mb": round(info.uss / 2**20)}
        )
    return rows


def histogram_sum(worker: RuntimeWorker, name: str) -> float:
    return sum(v for _, v in sample_values(worker.metrics(), name + "_sum"))


# --- tests ----------------------------------------------------------------------------------


async def test_worker_registers_and_serves_health(worker: RuntimeWorker) -> None:
    code, body = http_get(f"http://127.0.0.1:{worker.health_port}/")
    assert (code, body) == (200, "OK")
    code, body = worker.readiness()
    assert code == 200, body
    assert f"registered with LiveKit as {worker.config['dispatchName']!r}" in body
    status = worker.status()
    assert status["agent_name"] == worker.config["dispatchName"]
    assert status["worker_load"] == 0
    # The turn-detector model files are not on this machine: the start-up log says so.
    assert "FALLING BACK to vad" in worker.log()
    metrics = worker.metrics()
    fallback = sample_values(metrics, "voicefleet_turn_detector_fallback")
    assert fallback == [({"agent": "support", "requested": "english", "tenant": "acme"}, 1.0)]


async def test_worker_is_not_ready_until_registered_with_livekit(
    livekit: LiveKitEndpoint, module_providers: ProviderServer, tmp_path: Path
) -> None:
    """livekit-agents' `/` says OK while connecting; the readiness probe's /ready must not."""
    dead_port = free_port()  # nothing listens: the worker keeps retrying to connect
    unreachable = LiveKitEndpoint(
        url=f"ws://127.0.0.1:{dead_port}",
        api_key=livekit.api_key,
        api_secret=livekit.api_secret,
    )
    config = runtime_config(
        f"unready-{uuid.uuid4().hex[:6]}", module_providers.base_url, "http://127.0.0.1:9"
    )
    worker = RuntimeWorker(unreachable, config, tmp_path / "worker")
    worker.start()
    try:

        def serving() -> bool:
            assert worker.process is not None
            if worker.process.poll() is not None:
                worker.fail(f"worker exited with {worker.process.returncode}")
            try:
                worker.readiness()
                http_get(f"http://127.0.0.1:{worker.health_port}/")
            except urllib.error.URLError:  # not listening yet
                return False
            return True

        await wait_until("the worker's HTTP servers", serving, REGISTER_TIMEOUT_S)
        # After each of several failed connection attempts (livekit-agents logs each one):
        # / says OK, /ready says why the worker is not ready.
        for attempts in (1, 2, 3):
            await wait_until(
                f"failed connection attempt {attempts} in the worker's log",
                lambda: worker.log().count(CONNECT_FAILED) >= attempts,  # noqa: B023
                60,
                describe=worker.log_tail,
            )
            assert http_get(f"http://127.0.0.1:{worker.health_port}/") == (200, "OK")
            code, body = worker.readiness()
            assert code == 503, body
            assert "not registered with LiveKit" in body, body
    finally:
        await worker.stop()


async def test_call_greets_hears_the_question_and_replies(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    record_property: Callable[[str, object], None],
) -> None:
    main, _ = worker.processes()
    idle = worker_memory(main)
    greeting_sum = histogram_sum(worker, "voicefleet_dispatch_to_greeting_seconds")

    fresh_providers.script_transcripts("What are your opening hours?")
    fresh_providers.script_llm(LLMReply("We are open from nine to five.", match="opening hours"))
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        dispatch_to_greeting = await call.wait_for_greeting()
        assert call.caller.received_audio(call.agent_identity).rms > 0.01
        assert spoken(fresh_providers) == GREETING

        active = worker_memory(main)

        reply_at = await call.ask("What are your opening hours?")
        stt = fresh_providers.requests("stt")
        assert stt and stt[0]["transcript"] == "What are your opening hours?", stt
        chats = fresh_providers.requests("chat")
        users = [m for m in chat_messages(chats[-1]) if m["role"] == "user"]
        assert users[-1]["content"] == "What are your opening hours?"
        assert spoken(fresh_providers) == f"{GREETING} We are open from nine to five."
        assert worker.status()["active_jobs"] == 1

    report = {
        # From create_dispatch to the caller hearing the greeting (includes the caller joining).
        "dispatch_to_greeting_s": round(dispatch_to_greeting, 3),
        # As the worker measures it: job request received to the greeting's first audio frame.
        "job_request_to_greeting_s": round(
            histogram_sum(worker, "voicefleet_dispatch_to_greeting_seconds") - greeting_sum, 3
        ),
        "question_end_to_reply_s": round(reply_at - call.caller.phrases[-1].ended_at, 3),
        "idle_worker_memory": idle,
        "worker_memory_during_call": active,
    }
    print("runtime measurements:", json.dumps(report))
    for key, value in report.items():
        record_property(key, value)
    assert dispatch_to_greeting < 10


async def test_webhook_tool_gets_the_arguments_the_llm_chose(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    webhooks: Webhooks,
) -> None:
    fresh_providers.script_transcripts("Where is my order A-1234?")
    fresh_providers.script_llm(
        LLMReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-1234"})], match="order")
    )
    before = len(webhooks.calls)
    # The attributes livekit-sip gives a phone caller (tests/e2e/test_telephony.py: the real one).
    phone = {"sip.phoneNumber": "+15550001111", "sip.trunkPhoneNumber": "+15557654321"}
    async with dispatched_call(livekit, worker.config["dispatchName"], phone) as call:
        await call.wait_for_greeting()
        await call.ask("Where is my order A-1234?")
        calls = webhooks.calls[before:]
        assert [c["body"] for c in calls] == [{"order_id": "A-1234"}]
        headers = calls[0]["headers"]
        assert headers["Authorization"] == ORDERS_TOKEN
        # The webhook is told which call asks.
        assert headers["X-VoiceFleet-Caller-Number"] == "+15550001111"
        assert headers["X-VoiceFleet-Dialed-Number"] == "+15557654321"
        assert headers["X-VoiceFleet-Room"] == call.room
        assert headers["X-VoiceFleet-Agent"] == "receptionist"
        # The LLM saw the tool's result and its answer was spoken.
        tool_messages = [
            m
            for r in fresh_providers.requests("chat")
            for m in chat_messages(r)
            if m["role"] == "tool"
        ]
        assert tool_messages and "shipped" in tool_messages[-1]["content"]
        assert "shipped" in spoken(fresh_providers)


async def test_failing_webhook_is_apologised_for_and_the_call_goes_on(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    webhooks: Webhooks,
) -> None:
    apology = "I am sorry, I could not look that parcel up right now."
    fresh_providers.script_transcripts("Can you find parcel B-9?", "Thank you anyway.")
    fresh_providers.script_llm(
        LLMReply(tool_calls=[ToolCall("broken_lookup", {"parcel": "B-9"})], match="parcel"),
        LLMReply(apology, after="tool"),
        LLMReply("You are welcome.", match="thank you"),
    )
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        await call.wait_for_greeting()
        await call.ask("Can you find parcel B-9?")
        assert webhooks.calls[-1] == {"path": "/broken", "body": {"parcel": "B-9"}}
        tool_messages = [
            m
            for r in fresh_providers.requests("chat")
            for m in chat_messages(r)
            if m["role"] == "tool"
        ]
        assert "HTTP 500" in tool_messages[-1]["content"], tool_messages
        assert apology in spoken(fresh_providers)
        # Not a crash: the same call answers the next question.
        await call.ask("Thank you anyway.")
        assert spoken(fresh_providers).endswith("You are welcome.")
        assert worker.status()["active_jobs"] == 1


async def test_handoff_switches_agent_and_keeps_the_conversation(
    worker: RuntimeWorker, livekit: LiveKitEndpoint, fresh_providers: ProviderServer
) -> None:
    question = "I have a question about my invoice."
    fresh_providers.script_transcripts(question)
    fresh_providers.script_llm(
        LLMReply(
            tool_calls=[ToolCall("transfer_to_billing", {"reason": "invoice question"})],
            match="invoice",
        ),
        LLMReply("This is billing, I can help with your invoice.", match="invoice"),
    )
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        await call.wait_for_greeting()
        await call.ask(question)
        chats = fresh_providers.requests("chat")
        assert len(chats) >= 2, chats
        first, billing = chats[0], chats[-1]
        assert "transfer_to_billing" in tool_names(first)
        # The billing agent's own request: its instructions, its tools, the earlier turns.
        messages = chat_messages(billing)
        assert messages[0]["role"] in ("system", "developer")
        assert messages[0]["content"].startswith(BILLING_INSTRUCTIONS)
        assert "transfer_to_billing" not in tool_names(billing)
        said = [m.get("content") for m in messages]
        assert GREETING in said and question in said, messages
        assert spoken(fresh_providers).endswith("This is billing, I can help with your invoice.")


async def test_metrics_include_job_processes_and_usage(
    worker: RuntimeWorker, livekit: LiveKitEndpoint, fresh_providers: ProviderServer
) -> None:
    fresh_providers.script_transcripts("Tell me something.")
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        await call.wait_for_greeting()
        await call.ask("Tell me something.")
        during = worker.metrics()
        assert sample_values(during, "voicefleet_active_jobs")[0][1] >= 1
    # The caller hung up: the job ends and its slot is free again.
    await wait_until("the job to end", lambda: worker.status()["active_jobs"] == 0, 30)
    await wait_until(
        "voicefleet_active_jobs back at 0",
        lambda: sample_values(worker.metrics(), "voicefleet_active_jobs")[0][1] == 0,
        30,
    )
    text = worker.metrics()
    series = [line for line in text.splitlines() if line.startswith("voicefleet_")]
    assert all('tenant="acme"' in line and 'agent="support"' in line for line in series)
    # Written by job processes (main never touches these):
    for name in (
        "voicefleet_calls_started_total",
        "voicefleet_calls_ended_total",
        "voicefleet_turn_latency_seconds_count",
        "voicefleet_llm_ttft_seconds_count",
        "voicefleet_tts_ttfb_seconds_count",
        "voicefleet_stt_delay_seconds_count",
        "voicefleet_dispatch_to_greeting_seconds_count",
    ):
        assert sum(v for _, v in sample_values(text, name)) >= 1, name
    # Usage a tenant is billed from, by provider and model.
    for name in (
        "voicefleet_llm_prompt_tokens_total",
        "voicefleet_llm_completion_tokens_total",
        "voicefleet_tts_characters_total",
        "voicefleet_stt_audio_seconds_total",
        "voicefleet_call_seconds_total",
    ):
        samples = sample_values(text, name)
        assert samples and sum(v for _, v in samples) > 0, name
    llm_usage = sample_values(text, "voicefleet_llm_prompt_tokens_total")
    assert {labels["provider"] for labels, _ in llm_usage} == {"openai"}
    assert sample_values(text, "voicefleet_dispatch_accepted_total")[0][1] >= 1


async def test_two_workers_never_exceed_jobs_per_worker(
    livekit: LiveKitEndpoint,
    module_providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
) -> None:
    """jobsPerWorker=2 (loadThreshold 1.0), two workers, six simultaneous dispatches: four
    callers get the agent, no worker ever runs more than two calls, and the other two get the
    overflow treatment (an agent with the voicefleet.overflow attribute says the message and
    leaves) instead of nothing."""
    dispatch_name = f"acme-capacity-{uuid.uuid4().hex[:6]}"
    configs = [
        runtime_config(
            dispatch_name,
            module_providers.base_url,
            webhooks.url,
            jobsPerWorker=2,
            idleProcesses=2,
            loadThreshold=1.0,
        )
        for _ in range(2)
    ]
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(running_worker(livekit, config, tmp_path / f"w{i}"))
            for i, config in enumerate(configs)
        ]
        peaks = [0, 0]
        stop_polling = asyncio.Event()

        async def poll() -> None:
            while not stop_polling.is_set():
                for index, running in enumerate(workers):
                    status = await asyncio.to_thread(running.status)
                    peaks[index] = max(peaks[index], int(status["active_jobs"]))
                    assert status["active_jobs"] <= 2, (index, status)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        rooms = [f"capacity-{uuid.uuid4().hex[:8]}" for _ in range(6)]
        async with livekit.api() as lkapi:
            await dispatch_at_once(lkapi, dispatch_name, rooms)

            told: set[str] = set()

            async def agents_in(room: str) -> int:
                """Agents in the room that answer the call (overflow agents noted in `told`)."""
                response = await lkapi.room.list_participants(
                    api.ListParticipantsRequest(room=room)
                )
                agents = [
                    p for p in response.participants if p.kind == api.ParticipantInfo.Kind.AGENT
                ]
                if any("voicefleet.overflow" in p.attributes for p in agents):
                    told.add(room)
                return sum(1 for p in agents if "voicefleet.overflow" not in p.attributes)

            served: list[int] = []
            deadline = time.monotonic() + 30

            def everyone_answered_or_told() -> bool:
                return all(n or room in told for n, room in zip(served, rooms, strict=True))

            while time.monotonic() < deadline:
                served = [await agents_in(room) for room in rooms]
                if everyone_answered_or_told():
                    break
                await asyncio.sleep(0.2)

            # Every offer decided: each of the six dispatches was taken or told by a worker
            # (livekit-server offers a dispatch until a worker takes it, so nothing is left to
            # place once the workers' counts add up to six).
            def decided() -> float:
                return sum(
                    v
                    for w in workers
                    for name in (
                        "voicefleet_dispatch_accepted_total",
                        "voicefleet_calls_overflowed_total",
                    )
                    for _, v in sample_values(w.metrics(), name)
                )

            await wait_until("six offers decided", lambda: decided() >= len(rooms), 30)
            served = [await agents_in(room) for room in rooms]
            stop_polling.set()
            await poller

            for room in rooms:
                with contextlib.suppress(api.TwirpError):
                    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))

        # livekit-server offers each job to a worker picked at random among the available ones,
        # and a worker at its two calls gives the overflow treatment rather than refuse (which
        # would strand the caller): so between two (all to one worker) and four callers get the
        # agent, never two agents in a room, and everyone else is told.
        assert all(n <= 1 for n in served), served
        assert 2 <= sum(served) <= 4, served
        assert everyone_answered_or_told(), (served, told)
        assert told == {room for room, count in zip(rooms, served, strict=True) if not count}
        assert max(peaks) <= 2, peaks  # (the poller also fails at once above two)
        accepted = [
            sum(v for _, v in sample_values(w.metrics(), "voicefleet_dispatch_accepted_total"))
            for w in workers
        ]
        assert all(n <= 2 for n in accepted) and sum(accepted) == sum(served), (accepted, served)
        overflowed = sum(
            v
            for w in workers
            for _, v in sample_values(w.metrics(), "voicefleet_calls_overflowed_total")
        )
        assert overflowed == len(told) == 6 - sum(served), (overflowed, told, served)


async def test_offers_above_capacity_get_the_overflow_treatment(
    livekit: LiveKitEndpoint,
    module_providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
) -> None:
    """loadThreshold 0.5 of 2 jobs: the worker takes floor(2 x 0.5) = 1 call. Two dispatches
    at once reach it before any load report does; the second caller gets the overflow
    treatment (counted with reason capacity), not the agent and not silence."""
    dispatch_name = f"acme-threshold-{uuid.uuid4().hex[:6]}"
    config = runtime_config(
        dispatch_name,
        module_providers.base_url,
        webhooks.url,
        jobsPerWorker=2,
        idleProcesses=1,
        loadThreshold=0.5,
    )
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        rooms = [f"threshold-{uuid.uuid4().hex[:8]}" for _ in range(2)]
        async with livekit.api() as lkapi:
            await dispatch_at_once(lkapi, dispatch_name, rooms)

            def overflowed() -> float:
                return sum(
                    value
                    for labels, value in sample_values(
                        worker.metrics(), "voicefleet_calls_overflowed_total"
                    )
                    if labels.get("reason") == "capacity"
                )

            await wait_until("an overflow counted", lambda: overflowed() >= 1, 30)
            await wait_until(
                "the first call running", lambda: worker.status()["active_jobs"] == 1, 30
            )
            # The overflowed caller is not given the agent later either: the caller joins, is
            # told (the treatment has run to its end), and still no agent came to the room.
            found = re.search(r"\(room (\S+)\) gets the overflow treatment", worker.log())
            assert found is not None, worker.log_tail()
            told_room = found.group(1)
            token = participant_token(livekit.api_key, livekit.api_secret, told_room, "caller")
            async with TestParticipant(livekit.url, token):
                await wait_until(
                    "the overflowed caller told",
                    lambda: f"told the caller in room {told_room}" in worker.log(),
                    60,
                    describe=worker.log_tail,
                )
                participants = await lkapi.room.list_participants(
                    api.ListParticipantsRequest(room=told_room)
                )
            assert not [
                p.identity
                for p in participants.participants
                if p.kind == api.ParticipantInfo.Kind.AGENT
                and "voicefleet.overflow" not in p.attributes
            ]
            assert worker.status()["active_jobs"] == 1
            assert overflowed() == 1
            accepted = sum(
                v for _, v in sample_values(worker.metrics(), "voicefleet_dispatch_accepted_total")
            )
            assert accepted == 1
            assert "gets the overflow treatment: capacity" in worker.log()
            for room in rooms:
                with contextlib.suppress(api.TwirpError):
                    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))


async def test_job_processes_keep_the_config_the_worker_started_with(
    livekit: LiveKitEndpoint,
    module_providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
) -> None:
    """The kubelet rewrites a mounted ConfigMap under a running pod. A job process started after
    that must still run the config its worker validated: here the new file has another greeting
    and a tool whose secret only new pods would have in their environment."""
    dispatch_name = f"acme-pinned-{uuid.uuid4().hex[:6]}"
    # No pre-warmed process: the call's job process starts (and reads its config) after the edit.
    config = runtime_config(dispatch_name, module_providers.base_url, webhooks.url, idleProcesses=0)
    async with running_worker(livekit, config, tmp_path / "worker") as worker:
        changed = copy.deepcopy(config)
        changed["agents"][0]["greeting"] = "This greeting belongs to the next rollout."
        changed["tools"][1]["http"]["headers"] = [
            {"name": "Authorization", "valueFromEnv": "ONLY_IN_THE_NEW_PODS"}
        ]
        worker.config_path.write_text(yaml.safe_dump(changed))
        module_providers.reset()
        async with dispatched_call(livekit, dispatch_name) as call:
            await call.wait_for_greeting()
            assert spoken(module_providers) == GREETING
        assert "ONLY_IN_THE_NEW_PODS" not in worker.log()
