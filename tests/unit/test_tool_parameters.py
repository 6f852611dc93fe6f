"""Tool parameter schemas are JSON Schema in the subset function-calling providers accept, and
model names are never empty: refused by the models naming the field and the fix (the operator
turns that into ConfigValid=False), and by the CRD's OpenAPI/CEL where it can say so."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from voicefleet_operator import crd
from voicefleet_operator.api import SpecError, parse_spec
from voicefleet_runtime.config import (
    PARAMETERS_MAX_PROPERTIES,
    PARAMETERS_SCHEMA,
    ConfigError,
    parse_config,
    tool_parameters_problem,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def example_spec() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text())["spec"])


def with_parameters(parameters: Any) -> dict[str, Any]:
    spec = example_spec()
    spec["tools"][0]["parameters"] = parameters
    return spec


def refusal(spec: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    return str(raised.value)


# The bad schemas the issue's random mutations got accepted, and their neighbours.
BAD_PARAMETERS: list[tuple[str, Any, str, str]] = [
    (
        "properties-string",
        {"properties": "+1555"},
        ".properties",
        "must be a mapping of argument name to JSON Schema (got '+1555'), "
        "e.g. {order_number: {type: string}}",
    ),
    ("properties-number", {"properties": -1}, ".properties", "must be a mapping"),
    ("properties-list", {"properties": [1, "a"]}, ".properties", "must be a mapping"),
    (
        "property-not-a-schema",
        {"properties": {"a": 1}},
        ".properties.a",
        "must be a JSON Schema mapping (got 1), e.g. {type: string, description: ...}",
    ),
    ("required-mapping", {"required": {}}, ".required", "list of argument names"),
    ("required-string", {"required": "not a url"}, ".required", "list of argument names"),
    ("required-number-item", {"required": [1]}, ".required[0]", "must be an argument name"),
    (
        "required-unknown",
        {"properties": {"a": {"type": "string"}}, "required": ["b"]},
        ".required[0]",
        "add the argument to properties or remove it from required",
    ),
    (
        "required-twice",
        {"properties": {"a": {"type": "string"}}, "required": ["a", "a"]},
        ".required[1]",
        "listed twice",
    ),
    (
        "control-character-type",
        {"type": "object", "properties": {"a": {"type": "\x01"}}},
        ".properties.a.type",
        "use one of array, boolean, integer, null, number, object, string",
    ),
    (
        "unknown-type",
        {"properties": {"a": {"type": "text"}}},
        ".properties.a.type",
        "is not a JSON Schema type",
    ),
    (
        "minimum-not-a-number",
        {"properties": {"a": {"type": "integer", "minimum": "1"}}},
        ".properties.a.minimum",
        "draft 2020-12",
    ),
    (
        "bad-regex",
        {"properties": {"a": {"type": "string", "pattern": "("}}},
        ".properties.a.pattern",
        "regex",
    ),
    (
        "nested-items-not-a-schema",
        {"properties": {"a": {"type": "array", "items": 3}}},
        ".properties.a.items",
        "draft 2020-12",
    ),
    (
        "type-string",
        {"type": "string"},
        ".type",
        "must be 'object' (got 'string'): a tool's parameters are a JSON Schema object whose "
        "properties are the arguments",
    ),
    ("type-list", {"type": ["object"]}, ".type", "must be 'object'"),
    (
        "top-level-anyOf",
        {"anyOf": [{"type": "object"}]},
        ".anyOf",
        "anyOf is not allowed at the top level of a tool's parameters (function-calling "
        "providers refuse it); describe the arguments with properties",
    ),
    ("top-level-oneOf", {"type": "object", "oneOf": []}, ".oneOf", "not allowed at the top"),
    ("top-level-allOf", {"type": "object", "allOf": []}, ".allOf", "not allowed at the top"),
    ("top-level-enum", {"type": "object", "enum": [{}]}, ".enum", "not allowed at the top"),
    ("top-level-const", {"type": "object", "const": {}}, ".const", "not allowed at the top"),
    ("top-level-not", {"type": "object", "not": {}}, ".not", "not allowed at the top"),
    (
        "too-many-properties",
        {"properties": {f"a{i}": {} for i in range(PARAMETERS_MAX_PROPERTIES + 1)}},
        ".properties",
        f"at most {PARAMETERS_MAX_PROPERTIES}",
    ),
    (
        # `dependencies` is the metaschema's other anyOf: its error is not about a type.
        "dependencies-not-a-schema",
        {"properties": {"a": {"dependencies": {"x": 5}}}},
        ".properties.a.dependencies.x",
        "5 is not valid under any of the given schemas; the parameters must be valid JSON "
        "Schema (draft 2020-12)",
    ),
    (
        "too-many-required",
        {
            "properties": {f"a{i}": {} for i in range(PARAMETERS_MAX_PROPERTIES)},
            "required": [f"a{i}" for i in range(PARAMETERS_MAX_PROPERTIES + 1)],
        },
        ".required",
        f"lists more than {PARAMETERS_MAX_PROPERTIES} arguments",
    ),
    (
        "property-name-with-dot",
        {"properties": {"a.b": {"type": 5}}},
        '.properties["a.b"].type',
        "is not a JSON Schema type",
    ),
]


@pytest.mark.parametrize(
    ("parameters", "where", "fix"),
    [case[1:] for case in BAD_PARAMETERS],
    ids=[case[0] for case in BAD_PARAMETERS],
)
def test_bad_parameters_are_refused_naming_the_field_and_the_fix(
    parameters: Any, where: str, fix: str
) -> None:
    message = refusal(with_parameters(parameters))
    assert message.startswith(f"spec.tools[0].parameters{where}: "), message
    assert fix in message


def test_the_runtime_config_refuses_them_too() -> None:
    document = {
        "tenant": "acme",
        "name": "support",
        "dispatchName": "acme.support",
        "agents": [{"name": "a", "instructions": "x", "tools": ["t"]}],
        "entry": "a",
        "tools": [
            {
                "name": "t",
                "description": "d",
                "parameters": {"properties": {"n": {"type": "\x01"}}},
                "http": {"url": "http://t"},
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"^tools\[0\]\.parameters\.properties\.n\.type: "):
        parse_config(document)


GOOD_PARAMETERS: list[Any] = [
    {},
    {"type": "object"},
    {"type": "object", "properties": {}, "required": []},
    {
        "type": "object",
        "properties": {
            "order": {"type": "string", "pattern": "^A-[0-9]+$", "description": "A-12345"},
            "items": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "when": {"type": ["string", "null"], "format": "date"},
            "kind": {"enum": ["refund", "exchange"]},
            "nested": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["order", "kind"],
        "additionalProperties": False,
    },
    # As many arguments as allowed, every one required.
    {
        "properties": {f"a{i}": {"type": "string"} for i in range(PARAMETERS_MAX_PROPERTIES)},
        "required": [f"a{i}" for i in range(PARAMETERS_MAX_PROPERTIES)],
    },
]


@pytest.mark.parametrize("parameters", GOOD_PARAMETERS)
def test_schemas_providers_accept_are_accepted(parameters: Any) -> None:
    spec = parse_spec(with_parameters(parameters))
    assert spec.tools[0].parameters == parameters
    assert tool_parameters_problem(parameters) is None
    Draft202012Validator.check_schema(parameters)


def test_plain_json_only() -> None:
    import datetime

    plain_json = (
        (),
        "must be plain JSON (mappings, lists, strings, finite numbers, booleans, null); "
        "quote dates and other values YAML would read as something else",
    )
    problem = tool_parameters_problem({"properties": {"d": {"enum": [datetime.date(2025, 1, 1)]}}})
    assert problem == plain_json
    problem = tool_parameters_problem({"properties": {"x": {"maximum": float("nan")}}})
    assert problem == plain_json


@pytest.mark.parametrize(
    "field",
    ["pipeline.tts.model", "pipeline.tts.voice", "pipeline.stt.model", "pipeline.llm.model"],
)
def test_empty_model_names_are_refused(field: str) -> None:
    spec = example_spec()
    section, kind, key = field.split(".")
    spec[section][kind][key] = ""
    message = refusal(spec)
    assert (
        message == f"spec.{field}: must not be empty; give a value (or leave an optional field out)"
    )


def test_omitted_tts_model_and_voice_mean_the_plugin_default() -> None:
    spec = example_spec()
    spec["pipeline"]["tts"] = {"provider": "elevenlabs"}
    parsed = parse_spec(spec)
    assert parsed.pipeline.tts.model is None and parsed.pipeline.tts.voice is None


# --- the CRD's share of the checks -----------------------------------------------------------


def _parameters_node() -> dict[str, Any]:
    schema = crd.openapi_schema()
    return crd._find(schema, "spec", "tools", "[]", "parameters")


def test_crd_types_parameters_structurally() -> None:
    node = _parameters_node()
    assert node["x-kubernetes-preserve-unknown-fields"] is True  # other keywords are kept
    assert node["properties"]["type"]["enum"] == ["object"]
    properties = node["properties"]["properties"]
    assert properties["type"] == "object"
    assert properties["maxProperties"] == PARAMETERS_MAX_PROPERTIES
    assert properties["additionalProperties"]["type"] == "object"
    required = node["properties"]["required"]
    assert required["items"] == {"type": "string"}
    assert required["x-kubernetes-list-type"] == "set"


def test_crd_rules_cover_required_and_the_forbidden_top_level_keywords() -> None:
    rules = {rule["fieldPath"]: rule["rule"] for rule in _parameters_node()[crd.api.VALIDATIONS]}
    assert rules[".required"].endswith("r in self.properties)")
    # `const` is a CEL keyword: Kubernetes' CEL spells the field __const__.
    assert rules[".const"] == "!has(self.__const__)"
    for keyword in ("anyOf", "oneOf", "allOf", "enum", "not"):
        assert rules[f".{keyword}"] == f"!has(self.{keyword})"
    assert PARAMETERS_SCHEMA["x-kubernetes-validations"] == _parameters_node()[crd.api.VALIDATIONS]


def test_example_parameters_unchanged_by_validation() -> None:
    spec = example_spec()
    before = copy.deepcopy(spec["tools"][0]["parameters"])
    assert parse_spec(spec).tools[0].parameters == before
