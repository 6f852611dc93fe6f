"""A VoiceAgent's `mcpServers` against a real MCP server.

The tenant's MCP server is the `mcp` SDK's own MCPServer over streamable HTTP, served by uvicorn
in a thread of the test process. A real worker process (`python -m voicefleet_runtime start`) on
a real livekit-server takes the calls; the local OpenAI-compatible provider server plays the LLM,
scripted to call the MCP server's tool. The conversation helpers come from
test_runtime_worker.py.

What livekit-agents 1.8.9 does with the runtime's session-level MCPToolsets (read in llm/mcp.py
and voice/agent_activity.py, and checked here): the call's first agent activity opens the MCP
session and lists the tools *before* the agent speaks, and handoffs keep that session; a server
that fails to connect is logged and left out (its tools are simply not offered), so the call goes
on, but the greeting waits until the connection attempt ends, for at most the server's timeout.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_testkit.net import free_port
from voicefleet_testkit.providers import LLMReply, ProviderServer, ToolCall
from voicefleet_testkit.waiting import wait_until

from tests.integration import test_runtime_worker as runtime_tests
from tests.integration.test_runtime_worker import (
    BILLING_INSTRUCTIONS,
    GREETING,
    RuntimeWorker,
    chat_messages,
    dispatched_call,
    runtime_config,
    spoken,
    tool_names,
)

pytestmark = pytest.mark.integration

# The provider-server fixtures of the runtime tests (one server per module, reset per test).
module_providers = runtime_tests.module_providers
fresh_providers = runtime_tests.fresh_providers

TOKEN_ENV = "STOCK_MCP_TOKEN"
STOCK_TOKEN = "Bearer stock-" + uuid.uuid4().hex[:12]
MCP_TIMEOUT_S = 5.0
"""The MCP server's timeoutSeconds: how long a call waits for it before giving up."""
SERVER_START_TIMEOUT_S = 30.0


@dataclass
class McpRequest:
    """One HTTP request the MCP server received."""

    method: str
    authorization: str | None
    session_id: str | None
    at: float


class StockMcpServer:
    """The tenant's MCP server, with one tool `check_stock(item)`.

    Records every tool call and every HTTP request (its Authorization header and MCP session).
    `stall_s` holds each request that long before answering, as an overloaded server would.
    `stop()` and `start()` take it down and bring it back on the same port.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.in_stock = random.randint(2, 99)  # the answer must come from here, not the test
        self.tool_calls: list[str] = []
        self.requests: list[McpRequest] = []
        self.stall_s = 0.0
        self.mcp = MCPServer("acme-stock")
        self.mcp.add_tool(self.check_stock)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def check_stock(self, item: str) -> str:
        """How many of an item the Acme warehouse has in stock."""
        self.tool_calls.append(item)
        return self.answer(item)

    def answer(self, item: str) -> str:
        return f"{self.in_stock} {item} in stock at the Leeds warehouse"

    def _recording(self, app: ASGIApp) -> ASGIApp:
        async def recording_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
                self.requests.append(
                    McpRequest(
                        scope["method"],
                        headers.get("authorization"),
                        headers.get("mcp-session-id"),
                        time.monotonic(),
                    )
                )
                if self.stall_s:
                    await asyncio.sleep(self.stall_s)
            await app(scope, receive, send)

        return recording_app

    def start(self) -> None:
        # A new app each time: its session manager runs only once.
        config = uvicorn.Config(
            self._recording(self.mcp.streamable_http_app()),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        # Its own thread and loop: uvicorn only installs signal handlers in the main thread.
        thread = threading.Thread(target=server.run, name="mcp-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"the MCP server did not start on port {self.port}", pytrace=False)
            time.sleep(0.05)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            pytest.fail("the MCP server did not stop within 30s", pytrace=False)
        self._server = self._thread = None

    def requests_since(self, started: float) -> list[McpRequest]:
        return [request for request in self.requests if request.at >= started]

    def sessions_since(self, started: float) -> list[str]:
        """Ids of the MCP sessions opened at or after `started`, in order."""
        earlier = {request.session_id for request in self.requests if request.at < started}
        opened: list[str] = []
        for request in self.requests_since(started):
            if request.session_id and request.session_id not in {*earlier, *opened}:
                opened.append(request.session_id)
        return opened

    def first_seen(self, session_id: str) -> float:
        return min(r.at for r in self.requests if r.session_id == session_id)

    def closed_at(self, session_id: str) -> float | None:
        """When the client ended the session (DELETE), if it did."""
        deletes = [
            r.at for r in self.requests if r.session_id == session_id and r.method == "DELETE"
        ]
        return deletes[0] if deletes else None

    def all_closed(self, session_ids: list[str]) -> bool:
        return all(self.closed_at(session_id) is not None for session_id in session_ids)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_server() -> Iterator[StockMcpServer]:
    server = StockMcpServer()
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(
    livekit: LiveKitEndpoint,
    module_providers: ProviderServer,
    stock_server: StockMcpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RuntimeWorker]:
    dispatch_name = f"acme-mcp-{uuid.uuid4().hex[:6]}"
    # Webhook tools are configured but not called here.
    config = runtime_config(dispatch_name, module_providers.base_url, "http://127.0.0.1:9")
    config["mcpServers"] = [
        {
            "name": "stock",
            "url": stock_server.url,
            "timeoutSeconds": MCP_TIMEOUT_S,
            "headers": [{"name": "Authorization", "valueFromEnv": TOKEN_ENV}],
        }
    ]
    running = RuntimeWorker(livekit, config, tmp_path_factory.mktemp("mcp-worker"))
    running.env[TOKEN_ENV] = STOCK_TOKEN  # as the operator does from the tenant's Secret
    running.start()
    try:
        await running.wait_registered()
        yield running
    finally:
        await running.stop()


def tool_messages(providers: ProviderServer) -> list[dict[str, Any]]:
    return [
        message
        for request in providers.requests("chat")
        for message in chat_messages(request)
        if message["role"] == "tool"
    ]


def offered_schema(request: dict[str, Any], name: str) -> dict[str, Any]:
    for tool in request["body"].get("tools", []):
        if tool["function"]["name"] == name:
            return dict(tool["function"])
    raise AssertionError(f"{name} not offered; tools: {sorted(tool_names(request))}")


def report(record_property: Callable[[str, object], None], **figures: float) -> None:
    rounded = {key: round(value, 3) for key, value in figures.items()}
    print("mcp measurements:", json.dumps(rounded))
    for key, value in rounded.items():
        record_property(key, value)


# --- tests ----------------------------------------------------------------------------------


async def test_mcp_tool_is_offered_called_with_the_llm_arguments_and_its_answer_spoken(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    stock_server: StockMcpServer,
    record_property: Callable[[str, object], None],
) -> None:
    question = "Do you have blue kettles in stock?"
    fresh_providers.script_transcripts(question)
    fresh_providers.script_llm(
        LLMReply(tool_calls=[ToolCall("check_stock", {"item": "blue kettles"})], match="kettles")
    )
    started = time.monotonic()
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        dispatch_to_greeting = await call.wait_for_greeting()
        assert spoken(fresh_providers) == GREETING
        reply_at = await call.ask(question)

        # 1. Offered to the LLM with the schema the MCP server declares, next to the webhooks.
        first = fresh_providers.requests("chat")[0]
        assert {"check_stock", "lookup_order"} <= tool_names(first)
        schema = offered_schema(first, "check_stock")
        assert schema["description"] == "How many of an item the Acme warehouse has in stock."
        assert schema["parameters"]["properties"]["item"]["type"] == "string"
        assert schema["parameters"]["required"] == ["item"]

        # 2. The MCP server ran the tool with the LLM's arguments; the LLM got its answer
        # (livekit-agents passes the MCP content item as JSON) and it was spoken.
        assert stock_server.tool_calls[-1:] == ["blue kettles"]
        answer = stock_server.answer("blue kettles")
        results = tool_messages(fresh_providers)
        assert len(results) == 1, results
        assert json.loads(results[0]["content"])["text"] == answer
        assert answer in spoken(fresh_providers)

    # One MCP session for the call, ended when the call ends.
    sessions = stock_server.sessions_since(started)
    assert len(sessions) == 1, stock_server.requests_since(started)
    await wait_until("the call's MCP session to end", lambda: stock_server.all_closed(sessions), 30)
    # 3. Every request of the call carried the header from the worker's environment.
    requests = stock_server.requests_since(started)
    assert {r.method for r in requests} >= {"POST", "GET", "DELETE"}, requests
    assert [r for r in requests if r.authorization != STOCK_TOKEN] == []
    # The secret itself is never logged.
    assert STOCK_TOKEN.split()[1] not in worker.log()
    report(
        record_property,
        dispatch_to_greeting_s=dispatch_to_greeting,
        question_end_to_reply_with_mcp_tool_s=reply_at - call.caller.phrases[-1].ended_at,
    )


async def test_mcp_tools_follow_a_handoff_to_the_next_agent(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    stock_server: StockMcpServer,
) -> None:
    question = "I have a question about my invoice for the red toasters."
    fresh_providers.script_transcripts(question)
    fresh_providers.script_llm(
        LLMReply(
            tool_calls=[ToolCall("transfer_to_billing", {"reason": "invoice question"})],
            match="invoice",
        ),
        LLMReply(tool_calls=[ToolCall("check_stock", {"item": "red toasters"})], match="invoice"),
    )
    started = time.monotonic()
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        await call.wait_for_greeting()
        await call.ask(question)
        billing = [
            request
            for request in fresh_providers.requests("chat")
            if chat_messages(request)[0]["content"].startswith(BILLING_INSTRUCTIONS)
        ]
        assert billing, fresh_providers.requests("chat")
        assert "check_stock" in tool_names(billing[0])
        assert stock_server.tool_calls[-1:] == ["red toasters"]
        assert stock_server.answer("red toasters") in spoken(fresh_providers)
    # One MCP session for the whole call: the handoff kept it (no reconnect, no second wait),
    # and it ends with the call.
    sessions = stock_server.sessions_since(started)
    assert len(sessions) == 1, stock_server.requests_since(started)
    await wait_until("the call's MCP session to end", lambda: stock_server.all_closed(sessions), 30)


async def test_mcp_server_down_at_call_start_leaves_its_tools_out_and_the_call_goes_on(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    stock_server: StockMcpServer,
    record_property: Callable[[str, object], None],
) -> None:
    question = "Can you hear me?"
    stock_server.stop()
    try:
        log_before = len(worker.log())
        fresh_providers.script_transcripts(question)
        async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
            dispatch_to_greeting = await call.wait_for_greeting()
            assert spoken(fresh_providers) == GREETING
            await call.ask(question)  # the default LLM reply repeats it
            assert spoken(fresh_providers) == f"{GREETING} You said: {question}"
            chats = fresh_providers.requests("chat")
            assert "check_stock" not in tool_names(chats[0])
            assert "lookup_order" in tool_names(chats[0])
            assert worker.status()["active_jobs"] == 1
        # The worker says which server it was, and counts it.
        log = worker.log()[log_before:]
        assert "MCP server stock (" in log and "is unavailable" in log, log[-3000:]
        errors = runtime_tests.sample_values(worker.metrics(), "voicefleet_errors_total")
        assert any(labels.get("component") == "mcp" and value >= 1 for labels, value in errors), (
            errors
        )
    finally:
        stock_server.start()

    # Back up: the next call connects again, no worker restart needed.
    fresh_providers.reset()
    fresh_providers.script_transcripts("Do you have green mugs?")
    fresh_providers.script_llm(
        LLMReply(tool_calls=[ToolCall("check_stock", {"item": "green mugs"})], match="mugs")
    )
    async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
        await call.wait_for_greeting()
        await call.ask("Do you have green mugs?")
        assert "check_stock" in tool_names(fresh_providers.requests("chat")[0])
        assert stock_server.answer("green mugs") in spoken(fresh_providers)
    report(record_property, dispatch_to_greeting_mcp_down_s=dispatch_to_greeting)


async def test_unresponsive_mcp_server_delays_the_greeting_by_its_timeout_only(
    worker: RuntimeWorker,
    livekit: LiveKitEndpoint,
    fresh_providers: ProviderServer,
    stock_server: StockMcpServer,
    record_property: Callable[[str, object], None],
) -> None:
    """The MCP connection is made before the agent speaks: a server that accepts but does not
    answer holds the greeting until timeoutSeconds, then the call goes on without its tools."""
    question = "Are you there?"
    fresh_providers.script_transcripts(question)
    stock_server.stall_s = MCP_TIMEOUT_S + 5
    started = time.monotonic()
    try:
        async with dispatched_call(livekit, worker.config["dispatchName"]) as call:
            dispatch_to_greeting = await call.wait_for_greeting()
            stock_server.stall_s = 0
            assert stock_server.requests_since(started), "the call never tried the MCP server"
            assert dispatch_to_greeting >= MCP_TIMEOUT_S
            await call.ask(question)
            assert spoken(fresh_providers) == f"{GREETING} You said: {question}"
            assert "check_stock" not in tool_names(fresh_providers.requests("chat")[0])
    finally:
        stock_server.stall_s = 0
    report(record_property, dispatch_to_greeting_mcp_unresponsive_s=dispatch_to_greeting)
