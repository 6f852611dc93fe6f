"""Webhook tools: schema as the LLM sees it, secrets from the environment, and every way a
webhook can fail turning into a ToolError the agent can speak (against a real HTTP server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from livekit.agents import ToolError
from livekit.agents.llm import RawFunctionTool
from livekit.agents.llm.mcp import MCPServerHTTP
from voicefleet_runtime import tools
from voicefleet_runtime.agents import CallState
from voicefleet_runtime.config import HttpHeader, McpServerConfig, WebhookTool

LABELS = {"tenant": "acme", "agent": "support"}
SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "description": "The order id"}},
    "required": ["order_id"],
}


def webhook(url: str, **http: Any) -> WebhookTool:
    return WebhookTool.model_validate(
        {
            "name": "lookup_order",
            "description": "Look up an order.",
            "parameters": SCHEMA,
            "http": {"url": url, **http},
        }
    )


class Hooks:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "body": body,
                "authorization": request.headers.get("Authorization"),
            }
            | {k: v for k, v in request.headers.items() if k.startswith("X-VoiceFleet-")}
        )
        if request.path == "/slow":
            await asyncio.sleep(2)
        if request.path == "/fail":
            return web.json_response({"error": "boom"}, status=503)
        if request.path == "/text":
            return web.Response(text="plain answer")
        return web.json_response({"status": "shipped", "echo": body or dict(request.query)})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[str, Hooks]]:
    hooks = Hooks()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", hooks
    await runner.cleanup()


def test_raw_schema_is_the_tenants_json_schema() -> None:
    tool = webhook("https://example.com/orders")
    assert tools.raw_schema(tool) == {
        "name": "lookup_order",
        "description": "Look up an order.",
        "parameters": SCHEMA,
    }
    box = tools.ToolBox([tool], {}, LABELS)
    [function] = box.function_tools(["lookup_order"])
    assert isinstance(function, RawFunctionTool)
    assert function.info.name == "lookup_order"
    assert function.info.raw_schema["parameters"] == SCHEMA


def test_schema_without_properties_gets_an_empty_object() -> None:
    tool = WebhookTool.model_validate(
        {
            "name": "ping",
            "description": "Ping.",
            "parameters": {"type": "object"},
            "http": {"url": "https://example.com/ping"},
        }
    )
    assert tools.raw_schema(tool)["parameters"] == {"type": "object", "properties": {}}


def test_headers_come_from_literal_values_and_the_environment() -> None:
    headers = [
        HttpHeader(name="X-Tenant", value="acme"),
        HttpHeader(name="Authorization", value_from_env="ORDERS_TOKEN"),
    ]
    assert tools.resolve_headers(headers, {"ORDERS_TOKEN": "Bearer s3cret"}) == {
        "X-Tenant": "acme",
        "Authorization": "Bearer s3cret",
    }
    with pytest.raises(tools.MissingSecretError, match="ORDERS_TOKEN") as error:
        tools.resolve_headers(headers, {})
    assert "s3cret" not in str(error.value)


async def test_post_sends_the_arguments_as_json_with_the_secret(
    server: tuple[str, Hooks],
) -> None:
    url, hooks = server
    header = {"name": "Authorization", "valueFromEnv": "ORDERS_TOKEN"}
    box = tools.ToolBox(
        [webhook(f"{url}/orders", headers=[header])], {"ORDERS_TOKEN": "Bearer t0k"}, LABELS
    )
    try:
        result = await box.callers["lookup_order"]({"order_id": "A-1"})
    finally:
        await box.aclose()
    assert hooks.seen == [
        {
            "method": "POST",
            "path": "/orders",
            "query": {},
            "body": {"order_id": "A-1"},
            "authorization": "Bearer t0k",
        }
    ]
    assert result == '{"status": "shipped", "echo": {"order_id": "A-1"}}'


async def test_the_webhook_is_told_which_call_asks(server: tuple[str, Hooks]) -> None:
    url, hooks = server
    box = tools.ToolBox([webhook(f"{url}/orders")], {}, LABELS)
    phone_call = CallState(
        caller_number="+15550001111",
        dialed_number="+15557654321",
        room="call_acme_support_+15550001111_x",
        current_agent="receptionist",
    )
    web_call = CallState(room="web-room", current_agent="receptionist")
    try:
        await box.callers["lookup_order"]({"order_id": "A-1"}, call=phone_call)
        await box.callers["lookup_order"]({"order_id": "A-2"}, call=web_call)
    finally:
        await box.aclose()
    phone, web_ = hooks.seen
    assert phone["body"] == {"order_id": "A-1"}  # the arguments stay the tenant's schema
    assert {k: v for k, v in phone.items() if k.startswith("X-")} == {
        "X-VoiceFleet-Caller-Number": "+15550001111",
        "X-VoiceFleet-Dialed-Number": "+15557654321",
        "X-VoiceFleet-Room": "call_acme_support_+15550001111_x",
        "X-VoiceFleet-Agent": "receptionist",
    }
    # Not a phone call: no number headers rather than empty ones.
    assert {k: v for k, v in web_.items() if k.startswith("X-")} == {
        "X-VoiceFleet-Room": "web-room",
        "X-VoiceFleet-Agent": "receptionist",
    }


async def test_get_sends_the_arguments_as_query_string(server: tuple[str, Hooks]) -> None:
    url, hooks = server
    box = tools.ToolBox([webhook(f"{url}/text", method="GET")], {}, LABELS)
    try:
        result = await box.callers["lookup_order"]({"order_id": "A-2", "limit": 3})
    finally:
        await box.aclose()
    assert hooks.seen[0]["query"] == {"order_id": "A-2", "limit": "3"}
    assert result == "plain answer"


async def test_non_2xx_is_a_tool_error_the_agent_can_speak(server: tuple[str, Hooks]) -> None:
    url, _ = server
    box = tools.ToolBox([webhook(f"{url}/fail")], {}, LABELS)
    try:
        with pytest.raises(ToolError, match=r"HTTP 503.*Apologise"):
            await box.callers["lookup_order"]({"order_id": "A-3"})
    finally:
        await box.aclose()


async def test_timeout_is_a_tool_error(server: tuple[str, Hooks]) -> None:
    url, _ = server
    box = tools.ToolBox([webhook(f"{url}/slow", timeoutSeconds=0.3)], {}, LABELS)
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(ToolError, match="did not answer in time"):
            await box.callers["lookup_order"]({"order_id": "A-4"})
    finally:
        await box.aclose()
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_unreachable_webhook_is_a_tool_error() -> None:
    box = tools.ToolBox([webhook("http://127.0.0.1:9/unreachable")], {}, LABELS)
    try:
        with pytest.raises(ToolError, match="could not be reached"):
            await box.callers["lookup_order"]({"order_id": "A-5"})
    finally:
        await box.aclose()


def test_mcp_servers_get_url_headers_and_timeout() -> None:
    config = McpServerConfig.model_validate(
        {
            "name": "crm",
            "url": "https://mcp.example.com/mcp",
            "timeoutSeconds": 7,
            "headers": [{"name": "Authorization", "valueFromEnv": "CRM_TOKEN"}],
        }
    )
    call = CallState(caller_number="+15550001111", room="call-1")
    server = tools.mcp_server(config, {"CRM_TOKEN": "Bearer c"}, call=call)
    assert isinstance(server, MCPServerHTTP)
    assert server.url == "https://mcp.example.com/mcp"
    assert server._headers == {
        "Authorization": "Bearer c",
        "X-VoiceFleet-Caller-Number": "+15550001111",
        "X-VoiceFleet-Room": "call-1",
    }
    assert server._timeout == 7
    assert server._use_streamable_http  # the default transport, whatever the URL's path
    assert server._allowed_tools is None  # every tool of the server


def test_mcp_transport_and_allowed_tools_are_passed_explicitly() -> None:
    config = McpServerConfig.model_validate(
        {
            "name": "legacy",
            # A path livekit-agents would guess to be streamable HTTP: the setting wins.
            "url": "https://mcp.example.com/mcp",
            "transport": "sse",
            "allowedTools": ["lookup_customer"],
        }
    )
    server = tools.mcp_server(config, {})
    assert not server._use_streamable_http
    assert server._allowed_tools == {"lookup_customer"}


def test_mcp_servers_become_one_toolset_each_named_after_the_server() -> None:
    configs = [
        McpServerConfig.model_validate({"name": name, "url": f"https://{name}.example.com/mcp"})
        for name in ("crm", "stock")
    ]
    toolsets = tools.build_mcp_toolsets(configs, {}, LABELS)
    assert [toolset.id for toolset in toolsets] == ["mcp-crm", "mcp-stock"]
    assert [toolset._mcp_server.url for toolset in toolsets] == [  # type: ignore[attr-defined]
        "https://crm.example.com/mcp",
        "https://stock.example.com/mcp",
    ]


def test_a_header_takes_exactly_one_of_value_and_value_from_env() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set exactly one of value or valueFromEnv"):
        HttpHeader(name="Authorization", value="Bearer x", value_from_env="ORDERS_TOKEN")
    with pytest.raises(ValidationError, match="set exactly one of value or valueFromEnv"):
        HttpHeader(name="Authorization")
    assert HttpHeader(name="Authorization", value_from_env="ORDERS_TOKEN").value is None
