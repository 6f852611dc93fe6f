"""`spec.worker.jobMemoryLimitMB` on a real worker process (`python -m voicefleet_runtime
start`) with two calls at once: a tool whose service streams an endless answer makes one call's
job process grow past the limit; livekit-agents kills that process (its log says so), that
caller loses the agent, and the other call on the same worker goes on: its next question is
answered by the same agent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import (
    Webhooks,
    dispatched_call,
    running_worker,
    runtime_config,
)

pytestmark = pytest.mark.integration

MEMORY_WARN_MB = 400
MEMORY_LIMIT_MB = 700
CHUNK = b"x" * 2**20
STREAM_MB_PER_S = 100  # fast enough to pass the limit between two 5 s memory samples
BLOATING_QUESTION = "Please read me the whole catalogue."
QUESTION = "What are your opening hours?"
ANSWER = "We open at nine."
KILLED = "process exceeded memory limit, killing it"  # livekit-agents' supervisor


class EndlessCatalogue(Webhooks):
    """The tenant's webhooks plus /catalogue: an answer that never ends (1 MB chunks) until
    the caller goes; `sent_mb` counts what left."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_mb = 0
        self.app.router.add_post("/catalogue", self._catalogue)

    async def _catalogue(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            while True:
                await response.write(CHUNK)
                self.sent_mb += 1
                await asyncio.sleep(1 / STREAM_MB_PER_S)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the job process that read it is gone
        return response


@pytest_asyncio.fixture
async def catalogue() -> AsyncIterator[EndlessCatalogue]:
    hooks = EndlessCatalogue()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


async def test_a_job_over_its_memory_limit_is_killed_and_the_other_call_goes_on(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    catalogue: EndlessCatalogue,
    tmp_path: Path,
) -> None:
    dispatch_name = f"acme-memory-{uuid.uuid4().hex[:6]}"
    config = runtime_config(
        dispatch_name,
        providers.base_url,
        catalogue.url,
        jobsPerWorker=2,
        idleProcesses=2,
        loadThreshold=1.0,
        jobMemoryWarnMB=MEMORY_WARN_MB,
        jobMemoryLimitMB=MEMORY_LIMIT_MB,
    )
    config["tools"].append(
        {
            "name": "read_catalogue",
            "description": "Read the whole product catalogue.",
            "parameters": {"type": "object", "properties": {}},
            "http": {"url": f"{catalogue.url}/catalogue", "timeoutSeconds": 120},
        }
    )
    config["agents"][0]["tools"].append("read_catalogue")
    providers.script_transcripts(BLOATING_QUESTION, QUESTION)
    providers.script_llm(
        LLMReply(tool_calls=[ToolCall("read_catalogue", {})], match="catalogue"),
        LLMReply(ANSWER, match="opening hours"),
    )
    async with (
        running_worker(livekit, config, tmp_path / "worker") as worker,
        dispatched_call(livekit, dispatch_name) as bloated,
        dispatched_call(livekit, dispatch_name) as other,
    ):
        await asyncio.gather(bloated.wait_for_greeting(), other.wait_for_greeting())
        assert bloated.agent_identity != other.agent_identity
        assert worker.status()["active_jobs"] == 2

        # The first caller's question makes its job process read the endless answer.
        await bloated.caller.say(BLOATING_QUESTION)
        await wait_until(
            "the job process killed over its memory limit",
            lambda: KILLED in worker.log(),
            120,
            describe=worker.log_tail,
        )
        assert catalogue.sent_mb >= 100, catalogue.sent_mb  # what it grew by was read
        await wait_until(
            "the killed job's agent gone from its room",
            lambda: bloated.agent_identity not in bloated.caller.remote_identities(),
            60,
            describe=worker.log_tail,
        )

        # The other call, on the same worker, goes on with the same agent.
        assert other.agent_identity in other.caller.remote_identities()
        await other.ask(QUESTION)
        assert worker.process is not None and worker.process.poll() is None
        assert worker.log().count(KILLED) == 1, worker.log_tail()
        answered = [
            r for r in providers.requests("chat") if r["reply"]["text"] == ANSWER
        ]  # the reply the other caller heard came from the LLM after the kill
        assert len(answered) == 1, providers.requests("chat")
