"""The runtime config's validation helpers: the error report (every problem, one line each, the
field's path) and the CEL spellings the CRD's rules are built from."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import Field, ValidationError
from voicefleet_runtime.config import (
    ConfigError,
    Model,
    RuntimeConfig,
    _at_defaults,
    _cel_field,
    describe_validation_error,
    parse_config,
)


def test_cel_escapes_field_names_that_are_cel_keywords() -> None:
    """Kubernetes' CEL reads a field named like a CEL keyword (`const`, `in`, `var`) only as
    `__keyword__`; a rule written `self.const` would make the API server refuse the CRD."""
    assert _cel_field("const") == "__const__"
    assert _cel_field("in") == "__in__"
    assert _cel_field("anyOf") == "anyOf"
    assert _cel_field("properties") == "properties"


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tenant": "acme",
        "name": "support",
        "dispatchName": "acme-support",
        "agents": [{"name": "front-desk", "instructions": "Help."}],
        "entry": "front-desk",
    }
    return config | changes


def test_a_bad_nested_field_does_not_hide_a_bad_entry() -> None:
    """Pydantic skips the cross-field checks (entry names an agent) once a nested field is
    invalid; the report still names both problems."""
    data = _config(pipeline={"stt": {"model": ""}}, entry="nobody")
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert str(raised.value).splitlines() == [
        "pipeline.stt.model: must not be empty; give a value (or leave an optional field out)",
        "(top level): entry 'nobody' names no agent; use one of ['front-desk']",
    ]


def test_a_bad_required_field_is_reported_once_not_again_as_missing() -> None:
    """Finding the hidden problems leaves reported fields out; a required field left out that
    way is not a second problem."""
    data = _config(agents=[{"name": "front-desk", "instructions": ""}])
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert str(raised.value).splitlines() == [
        "agents[0].instructions: must not be empty; give a value (or leave an optional field out)",
    ]


def test_reporting_every_problem_leaves_the_callers_document_as_it_was() -> None:
    """The operator reports the spec it was handed (a kopf body); finding the hidden problems
    must not delete fields from it."""
    data = _config(agents=[{"name": "front-desk", "instructions": ""}], entry="nobody")
    before = copy.deepcopy(data)
    with pytest.raises(ConfigError):
        parse_config(data)
    assert data == before


def test_the_realtime_rule_checks_each_part_by_its_wire_name_at_its_default() -> None:
    """The CEL twin of "realtime replaces stt, llm and tts": a part left out or at its defaults
    passes; each field is read by the name written in YAML (its alias), fields without a
    default must be absent."""

    class Part(Model):
        model: str = "nova-3"
        language_code: str | None = None
        sample_rate: int = Field(16000, alias="rate")

    assert _at_defaults("stt", Part) == (
        '(!has(self.stt) || (self.stt.model == "nova-3" && !has(self.stt.languageCode) && '
        "self.stt.rate == 16000))"
    )


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"bogus": 1}, "bogus: unknown field; check the spelling (fields are camelCase)"),
        ({"entry": None}, "entry: Input should be a valid string"),
        ({"agents": []}, "agents: List should have at least 1 item after validation, not 0"),
        (
            {"pipeline": {"stt": {"language": "e"}}},
            "pipeline.stt.language: String should have at least 2 characters",
        ),
        (
            {"pipeline": {"llm": {"model": ""}}},
            "pipeline.llm.model: must not be empty; give a value (or leave an optional field out)",
        ),
    ],
    ids=["unknown", "wrong-type", "empty-list", "short-string", "empty-string"],
)
def test_each_problem_is_one_line_naming_the_field(changes: dict[str, Any], line: str) -> None:
    """Pydantic's own message, except where a plainer one says what to do: an unknown field
    (spelling), a missing one (add it), an empty string (give a value); a list or a longer
    minimum keeps pydantic's wording, which gives the bound."""
    with pytest.raises(ConfigError) as raised:
        parse_config(_config(**changes))
    assert str(raised.value).splitlines() == [line]


def test_a_missing_field_says_to_add_it() -> None:
    data = _config()
    del data["entry"]
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert str(raised.value).splitlines() == ["entry: required field is missing; add it"]


def test_a_bad_tool_parameter_schema_is_named_inside_the_schema() -> None:
    tool = {
        "name": "lookup",
        "description": "Look an order up.",
        "parameters": {"properties": {"order": {"type": "text"}}},
        "http": {"url": "http://orders"},
    }
    data = _config(tools=[tool], agents=[{"name": "front-desk", "instructions": "x"}])
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert str(raised.value).splitlines() == [
        "tools[0].parameters.properties.order.type: 'text' is not a JSON Schema type; use one "
        "of array, boolean, integer, null, number, object, string (or a list of them)"
    ]


def test_a_validation_error_is_described_like_its_list_of_errors() -> None:
    with pytest.raises(ValidationError) as raised:
        RuntimeConfig.model_validate(_config(bogus=1, entry=""))
    assert describe_validation_error(raised.value, prefix="spec") == (
        "spec.entry: String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'\n"
        "spec.bogus: unknown field; check the spelling (fields are camelCase)"
    )


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        (
            {
                "agents": [
                    {"name": "front-desk", "instructions": "x"},
                    {"name": "front-desk", "instructions": "y"},
                ]
            },
            "(top level): agent name 'front-desk' is defined twice; names must be unique",
        ),
        (
            {
                "tools": [
                    {"name": "lookup", "description": "d", "http": {"url": "http://a"}},
                    {"name": "lookup", "description": "e", "http": {"url": "http://b"}},
                ]
            },
            "(top level): tool name 'lookup' is defined twice; names must be unique",
        ),
    ],
    ids=["agents", "tools"],
)
def test_a_name_defined_twice_is_refused(changes: dict[str, Any], line: str) -> None:
    """Agents and tools are referred to by name (entry, handoffs, an agent's tools): two with
    one name would make the reference ambiguous."""
    with pytest.raises(ConfigError) as raised:
        parse_config(_config(**changes))
    assert str(raised.value).splitlines() == [line]
