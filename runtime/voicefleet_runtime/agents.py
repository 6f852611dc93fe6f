"""The tenant's agents: one livekit Agent per configured agent, handoffs between them.

The entry agent takes the call. Each agent greets when it takes over (its `greeting` spoken as
is, or an LLM-generated opening when it has none). A handoff is a function tool
`transfer_to_<agent>` that returns the next Agent, built with a copy of the conversation so far;
the session's userdata (`CallState`) is shared by all agents of the call.

Instructions may refer to {caller_number} and {dialed_number}; for phone calls they come from
the SIP participant's attributes (sip.phoneNumber, sip.trunkPhoneNumber), otherwise they are
empty. Only these two placeholders are replaced, so other braces in instructions stay literal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import Agent, RunContext, function_tool
from livekit.agents.llm import ChatContext, RawFunctionTool

from voicefleet_runtime import metrics
from voicefleet_runtime.config import AgentConfig, RuntimeConfig
from voicefleet_runtime.tools import ToolBox

logger = logging.getLogger("voicefleet.runtime.agents")

SIP_CALLER_ATTRIBUTE = "sip.phoneNumber"
SIP_DIALED_ATTRIBUTE = "sip.trunkPhoneNumber"


@dataclass
class CallState:
    """Shared by every agent of one call (AgentSession.userdata)."""

    caller_number: str = ""
    dialed_number: str = ""
    room: str = ""
    current_agent: str = ""
    handoffs: list[tuple[str, str]] = field(default_factory=list)
    """(from, to) in order, for logs and tests."""
    values: dict[str, Any] = field(default_factory=dict)
    """Free-form state agents' tools may share."""

    @classmethod
    def from_participant_attributes(cls, attributes: dict[str, str], room: str = "") -> CallState:
        return cls(
            caller_number=attributes.get(SIP_CALLER_ATTRIBUTE, ""),
            dialed_number=attributes.get(SIP_DIALED_ATTRIBUTE, ""),
            room=room,
        )


def render_instructions(template: str, state: CallState) -> str:
    return template.replace("{caller_number}", state.caller_number).replace(
        "{dialed_number}", state.dialed_number
    )


def say_line(session: Any, text: str, *, allow_interruptions: bool = True) -> Any:
    """Say `text` as written: with the pipeline's TTS, or, with a realtime model (no TTS), by
    asking the model to say exactly these words. Returns the SpeechHandle."""
    if session.tts is not None:
        return session.say(text, allow_interruptions=allow_interruptions)
    return session.generate_reply(
        instructions=f'Say exactly the following words, and nothing else: "{text}"',
        allow_interruptions=allow_interruptions,
    )


def handoff_tool_name(agent_name: str) -> str:
    return "transfer_to_" + agent_name.replace("-", "_")


def handoff_schema(target: AgentConfig) -> dict[str, Any]:
    summary = " ".join(target.instructions.split())[:300]
    return {
        "name": handoff_tool_name(target.name),
        "description": (
            f"Hand the caller over to the {target.name} agent, keeping the conversation. "
            f"Use it when the caller needs what that agent does: {summary}"
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "reason": {
                    "type": "string",
                    "description": "One sentence on why the caller is handed over.",
                }
            },
            "required": [],
        },
    }


class ConfiguredAgent(Agent):
    """An agent from config; greets on enter."""

    def __init__(
        self,
        config: AgentConfig,
        state: CallState,
        tools: list[Any],
        chat_ctx: ChatContext | None = None,
    ) -> None:
        super().__init__(
            id=config.name,
            instructions=render_instructions(config.instructions, state),
            tools=tools,
            chat_ctx=chat_ctx,
        )
        self.config = config
        self.state = state

    async def on_enter(self) -> None:
        self.state.current_agent = self.config.name
        if self.config.greeting:
            say_line(self.session, render_instructions(self.config.greeting, self.state))
        else:
            self.session.generate_reply()


class AgentFactory:
    """Builds the configured agents of one call."""

    def __init__(
        self,
        config: RuntimeConfig,
        toolbox: ToolBox,
        state: CallState,
        call_tools: Callable[[], list[Any]] = list,
    ) -> None:
        self.config = config
        self.toolbox = toolbox
        self.state = state
        self.call_tools = call_tools
        """Tools every agent gets, fresh per agent (e.g. end_call, transfer_to_human)."""
        self._labels = {"tenant": config.tenant, "agent": config.name}

    def create(self, name: str, chat_ctx: ChatContext | None = None) -> ConfiguredAgent:
        agent_config = self.config.agent(name)
        tools: list[Any] = self.toolbox.function_tools(agent_config.tools)
        tools += [self._handoff_tool(agent_config.name, target) for target in agent_config.handoffs]
        tools += self.call_tools()
        return ConfiguredAgent(agent_config, self.state, tools, chat_ctx=chat_ctx)

    def entry(self) -> ConfiguredAgent:
        return self.create(self.config.entry)

    def _handoff_tool(self, source: str, target: str) -> RawFunctionTool:
        factory = self

        async def transfer(raw_arguments: dict[str, Any], context: RunContext) -> Agent:
            reason = str(raw_arguments.get("reason", ""))
            logger.info("handoff %s -> %s", source, target, extra={"reason": reason})
            factory.state.handoffs.append((source, target))
            metrics.HANDOFFS.labels(**factory._labels, from_agent=source, to_agent=target).inc()
            # The next agent starts from the conversation so far, without our instructions.
            history = context.session.current_agent.chat_ctx.copy(exclude_instructions=True)
            return factory.create(target, chat_ctx=history)

        return function_tool(transfer, raw_schema=handoff_schema(self.config.agent(target)))
