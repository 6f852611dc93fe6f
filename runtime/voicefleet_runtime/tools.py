"""Tenant tools: HTTP webhooks as LLM function tools, and MCP servers.

A webhook tool is a livekit-agents raw function tool: the LLM sees the tenant's JSON schema as
written, and the arguments it chose go to the webhook unchanged (JSON body, or query string for
GET/DELETE). Whatever goes wrong (timeout, connection error, non-2xx) becomes a ToolError with a
sentence the LLM can turn into an apology; the call goes on. Header secrets are read from the
environment (`valueFromEnv`) when the tool is built and never logged.

Every webhook request also says which call it is for, in headers (the arguments stay exactly
what the tenant's schema describes): X-VoiceFleet-Caller-Number and X-VoiceFleet-Dialed-Number
(phone calls only), X-VoiceFleet-Room and X-VoiceFleet-Agent (the agent calling the tool). MCP
servers get the same headers but X-VoiceFleet-Agent (one MCP session serves the whole call).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
from livekit.agents import RunContext, ToolError, function_tool
from livekit.agents.llm import RawFunctionTool

if TYPE_CHECKING:
    # Imported where used: livekit.agents.llm.mcp imports the mcp SDK (~130 modules: starlette,
    # uvicorn, jsonschema; ~25 MB and ~2.5 s a process), which only VoiceAgents with MCP servers
    # need. worker.py is preloaded into the forkserver, so an import here cost every worker
    # process that (issue 17's idle-memory gap against the plain livekit-agents agent).
    from livekit.agents.llm.mcp import MCPServerHTTP, MCPToolset

from voicefleet_runtime import metrics
from voicefleet_runtime.config import HttpHeader, McpServerConfig, WebhookTool

logger = logging.getLogger("voicefleet.runtime.tools")

MAX_RESULT_CHARS = 4000
"""Longer webhook answers are cut: the LLM reads the result on every later turn."""


class MissingSecretError(RuntimeError):
    """A header's valueFromEnv names an environment variable that is not set."""


def resolve_headers(headers: list[HttpHeader], environ: Mapping[str, str]) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for header in headers:
        if header.value_from_env:
            value = environ.get(header.value_from_env)
            if not value:
                raise MissingSecretError(
                    f"header {header.name!r} needs environment variable {header.value_from_env}, "
                    "which is not set; provide it from a Secret"
                )
            resolved[header.name] = value
        elif header.value is not None:
            resolved[header.name] = header.value
    return resolved


def raw_schema(tool: WebhookTool) -> dict[str, Any]:
    """The OpenAI function description livekit-agents sends for this tool."""
    parameters = dict(tool.parameters)
    parameters.setdefault("type", "object")
    parameters.setdefault("properties", {})
    return {"name": tool.name, "description": tool.description, "parameters": parameters}


CALL_HEADERS = {
    "caller_number": "X-VoiceFleet-Caller-Number",
    "dialed_number": "X-VoiceFleet-Dialed-Number",
    "room": "X-VoiceFleet-Room",
    "current_agent": "X-VoiceFleet-Agent",
}
"""Attribute of the call's state (agents.CallState) -> the header that carries it."""


def call_headers(call: Any) -> dict[str, str]:
    """The headers telling a webhook which call asks; empty values are left out."""
    found = {header: getattr(call, attribute, "") for attribute, header in CALL_HEADERS.items()}
    return {header: str(value) for header, value in found.items() if value}


def _result_text(body: bytes, content_type: str) -> str:
    text = body.decode("utf-8", errors="replace")
    if "json" in content_type:
        try:
            text = json.dumps(json.loads(text), ensure_ascii=False)
        except ValueError:
            pass
    return text[:MAX_RESULT_CHARS] if text else "done"


class WebhookCaller:
    """Calls one tenant webhook; shared by every agent of the call that lists the tool."""

    def __init__(
        self,
        tool: WebhookTool,
        headers: dict[str, str],
        session: Callable[[], aiohttp.ClientSession],
        labels: dict[str, str],
    ) -> None:
        self.tool = tool
        self._headers = {"Content-Type": "application/json", **headers}
        self._session = session
        self._labels = labels

    def _count(self, outcome: str, started: float) -> None:
        metrics.TOOL_CALLS.labels(**self._labels, tool=self.tool.name, outcome=outcome).inc()
        metrics.TOOL_LATENCY.labels(**self._labels, tool=self.tool.name).observe(
            time.monotonic() - started
        )
        if outcome != "ok":
            metrics.ERRORS.labels(**self._labels, component="tool", recoverable="true").inc()

    async def __call__(self, arguments: dict[str, Any], call: Any = None) -> str:
        """`call`: the call's state (agents.CallState), whose numbers and room go in headers."""
        endpoint = self.tool.http
        started = time.monotonic()
        request: dict[str, Any] = {"headers": {**call_headers(call), **self._headers}}
        if endpoint.method in ("GET", "DELETE"):
            request["params"] = {
                key: value if isinstance(value, str) else json.dumps(value)
                for key, value in arguments.items()
            }
        else:
            request["json"] = arguments
        try:
            async with asyncio.timeout(endpoint.timeout_seconds):
                async with self._session().request(endpoint.method, endpoint.url, **request) as r:
                    body = await r.read()
                    status, content_type = r.status, r.headers.get("Content-Type", "")
        except TimeoutError:
            self._count("timeout", started)
            logger.warning("tool %s timed out after %ss", self.tool.name, endpoint.timeout_seconds)
            raise ToolError(
                f"The {self.tool.name} service did not answer in time. Apologise to the caller, "
                "say you could not get that information right now, and offer to help otherwise."
            ) from None
        except aiohttp.ClientError as error:
            self._count("unreachable", started)
            logger.warning("tool %s failed: %s", self.tool.name, type(error).__name__)
            raise ToolError(
                f"The {self.tool.name} service could not be reached. Apologise to the caller and "
                "offer to help otherwise."
            ) from None
        if not 200 <= status < 300:
            self._count("http_error", started)
            logger.warning("tool %s returned HTTP %s", self.tool.name, status)
            raise ToolError(
                f"The {self.tool.name} service failed (HTTP {status}). Apologise to the caller, "
                "say it did not work this time, and offer to help otherwise."
            )
        self._count("ok", started)
        return _result_text(body, content_type)


def webhook_function_tool(caller: WebhookCaller) -> RawFunctionTool:
    async def call_webhook(raw_arguments: dict[str, Any], context: RunContext) -> str:
        return await caller(raw_arguments, call=context.userdata)

    return function_tool(call_webhook, raw_schema=raw_schema(caller.tool))


class ToolBox:
    """The call's tools: one HTTP session, one caller per configured webhook."""

    def __init__(
        self, tools: list[WebhookTool], environ: Mapping[str, str], labels: dict[str, str]
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.callers = {
            tool.name: WebhookCaller(
                tool, resolve_headers(tool.http.headers, environ), self.http_session, labels
            )
            for tool in tools
        }

    def http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def function_tools(self, names: list[str]) -> list[RawFunctionTool]:
        """Fresh tool objects for one agent (tools must not be shared between agents)."""
        return [webhook_function_tool(self.callers[name]) for name in names]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


MCP_TRANSPORTS: dict[str, Literal["streamable_http", "sse"]] = {
    "streamable-http": "streamable_http",
    "sse": "sse",
}


def mcp_server(
    config: McpServerConfig, environ: Mapping[str, str], call: Any = None
) -> MCPServerHTTP:
    """One MCP server of the call; its requests carry the call's headers, like webhooks'."""
    from livekit.agents.llm.mcp import MCPServerHTTP

    return MCPServerHTTP(
        url=config.url,
        # Explicit: livekit-agents would otherwise guess the transport from the URL's path.
        transport_type=MCP_TRANSPORTS[config.transport],
        allowed_tools=config.allowed_tools or None,
        headers={**call_headers(call), **resolve_headers(config.headers, environ)},
        timeout=config.timeout_seconds,
        client_session_timeout_seconds=config.timeout_seconds,
    )


@functools.cache
def tenant_mcp_toolset() -> Callable[[McpServerConfig, MCPServerHTTP, dict[str, str]], MCPToolset]:
    """The TenantMcpToolset class, defined on first use (see the TYPE_CHECKING import)."""
    from livekit.agents.llm.mcp import MCPToolset

    class TenantMcpToolset(MCPToolset):
        """MCPToolset that says which tenant server failed to connect, and counts it.

        livekit-agents logs a failed setup as "Error in _do_setup" with neither server name nor
        URL, and leaves the server's tools out of the call; the tenant needs to know which
        server it was.
        """

        def __init__(
            self, config: McpServerConfig, server: MCPServerHTTP, labels: dict[str, str]
        ) -> None:
            super().__init__(id=f"mcp-{config.name}", mcp_server=server)
            self.config = config
            self._labels = labels

        async def setup(self, *, reload: bool = False) -> Self:
            try:
                return await super().setup(reload=reload)
            except Exception as error:
                metrics.ERRORS.labels(**self._labels, component="mcp", recoverable="true").inc()
                logger.warning(
                    "MCP server %s (%s) is unavailable, its tools are left out of this call: %s",
                    self.config.name,
                    self.config.url,
                    type(error).__name__,
                )
                raise

    return TenantMcpToolset


def build_mcp_toolsets(
    servers: list[McpServerConfig],
    environ: Mapping[str, str],
    labels: dict[str, str],
    call: Any = None,
) -> list[MCPToolset]:
    """The MCP servers as livekit-agents toolsets, one per server, for the AgentSession."""
    if not servers:
        return []
    toolset = tenant_mcp_toolset()
    return [toolset(config, mcp_server(config, environ, call), labels) for config in servers]
