"""Agents from config: instructions with call facts, tools per agent, handoff tools."""

from __future__ import annotations

from typing import Any

from livekit.agents.llm import RawFunctionTool
from voicefleet_runtime.agents import (
    AgentFactory,
    CallState,
    handoff_schema,
    handoff_tool_name,
    render_instructions,
)
from voicefleet_runtime.config import RuntimeConfig
from voicefleet_runtime.tools import ToolBox

CONFIG: dict[str, Any] = {
    "tenant": "acme",
    "name": "support",
    "dispatchName": "acme-support",
    "agents": [
        {
            "name": "front-desk",
            "instructions": 'Caller {caller_number} dialed {dialed_number}. JSON: {"a": 1}',
            "greeting": "Hello!",
            "tools": ["lookup_order"],
            "handoffs": ["billing"],
        },
        {"name": "billing", "instructions": "You handle invoices and refunds."},
    ],
    "entry": "front-desk",
    "tools": [
        {
            "name": "lookup_order",
            "description": "Look up an order.",
            "http": {"url": "https://example.com/orders"},
        }
    ],
}


def names(tools: list[Any]) -> list[str]:
    return [tool.info.name for tool in tools]


def test_sip_attributes_fill_the_call_facts() -> None:
    state = CallState.from_participant_attributes(
        {"sip.phoneNumber": "+15551230001", "sip.trunkPhoneNumber": "+15559990000"}, room="r"
    )
    assert (state.caller_number, state.dialed_number, state.room) == (
        "+15551230001",
        "+15559990000",
        "r",
    )
    assert CallState.from_participant_attributes({}).caller_number == ""


def test_only_the_two_placeholders_are_replaced() -> None:
    state = CallState(caller_number="+1555", dialed_number="+1999")
    text = render_instructions(CONFIG["agents"][0]["instructions"], state)
    assert text == 'Caller +1555 dialed +1999. JSON: {"a": 1}'
    assert render_instructions("Caller {caller_number}.", CallState()) == "Caller ."


def test_factory_builds_agents_with_their_tools_and_handoffs() -> None:
    config = RuntimeConfig.model_validate(CONFIG)
    state = CallState(caller_number="+1555")
    extra_calls: list[int] = []

    def call_tools() -> list[Any]:
        extra_calls.append(1)
        return []

    factory = AgentFactory(config, ToolBox(config.tools, {}, {}), state, call_tools=call_tools)
    entry = factory.entry()
    assert entry.id == "front-desk"
    assert str(entry.instructions).startswith("Caller +1555 dialed .")
    assert names(entry.tools) == ["lookup_order", "transfer_to_billing"]
    billing = factory.create("billing")
    assert billing.tools == []
    # Shared userdata: every agent of the call holds the same CallState.
    assert entry.state is billing.state is state
    assert len(extra_calls) == 2  # fresh call tools per agent


def test_handoff_tool_schema_describes_the_target() -> None:
    config = RuntimeConfig.model_validate(CONFIG)
    schema = handoff_schema(config.agent("billing"))
    assert schema["name"] == handoff_tool_name("billing") == "transfer_to_billing"
    assert "invoices and refunds" in schema["description"]
    assert schema["parameters"]["type"] == "object"
    assert handoff_tool_name("front-desk") == "transfer_to_front_desk"
    factory = AgentFactory(config, ToolBox([], {}, {}), CallState())
    tool = factory._handoff_tool("front-desk", "billing")
    assert isinstance(tool, RawFunctionTool) and tool.info.raw_schema == schema
