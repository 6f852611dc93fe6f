"""Random VoiceAgent specs for property tests: mutations of the example spec and random tool
parameter schemas (Hypothesis strategies), and the checks that an outcome is acceptable: refused
naming a field, or accepted and valid (renders, loads in the runtime, tool schemas a provider
takes). The unit tests throw them at the models, the integration tests at the API server too."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import event
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from voicefleet_operator import render
from voicefleet_operator.api import VoiceAgentSpec
from voicefleet_operator.render import VoiceAgentRef
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime.config import (
    PARAMETERS_TOP_LEVEL_FORBIDDEN,
    ConfigError,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
SPEC = yaml.safe_load(EXAMPLE.read_text())["spec"]
SPEC_FIELDS = set(VoiceAgentSpec.model_json_schema(by_alias=True)["properties"])

SETTINGS = PlatformSettings(
    livekit_url="ws://livekit.voicefleet-system.svc:7880",
    livekit_secret_namespace="voicefleet-system",
    runtime_image="voicefleet/runtime:0.1.0",
)
LIVEKIT_DATA = {
    "LIVEKIT_API_KEY": base64.b64encode(b"devkey").decode(),
    "LIVEKIT_API_SECRET": base64.b64encode(b"not-a-real-secret").decode(),
}
REF = VoiceAgentRef(name="acme-support", namespace="acme", uid="0b3c1f7e-1111-4222-8333-4444")

# A field path as describe_validation_error writes it: spec, then .name / [index] / ["odd key"].
LINE = re.compile(r'^spec((\.[A-Za-z0-9_$-]+|\[[0-9]+\]|\["(?:[^"\\]|\\.)*"\])*): \S')

# --- strategies -------------------------------------------------------------------------------

text = st.one_of(
    st.sampled_from(
        ["", "object", "string", "integer", "+1555", "not a url", "a", "en", "nova-3", "\x01"]
    ),
    st.text(max_size=12),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
SCHEMA_KEYWORDS = [
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "description",
    "minimum",
    "pattern",
    "format",
    "additionalProperties",
    "anyOf",
    "$ref",
    *PARAMETERS_TOP_LEVEL_FORBIDDEN,
]
schema_values = st.one_of(
    st.sampled_from(["object", "string", "array", "nope", "\x01", ["string", "null"]]),
    json_values,
)
property_schemas = st.one_of(
    st.dictionaries(st.sampled_from(SCHEMA_KEYWORDS), schema_values, max_size=3),
    # Mostly well-formed ones too, so that accepted schemas are explored as well.
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "array", "object"])},
        optional={
            "description": text,
            "enum": st.lists(scalars, min_size=1, max_size=3),
            "minimum": st.one_of(st.integers(), text),
            "pattern": st.sampled_from(["^A-[0-9]+$", "(", "[a-z]"]),
            "items": st.one_of(st.just({"type": "string"}), schema_values),
        },
    ),
)
parameter_schemas = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.just("object"), schema_values),
        "properties": st.one_of(
            st.dictionaries(
                st.one_of(st.sampled_from(["order_number", "a", "x"]), text),
                st.one_of(property_schemas, json_values),
                max_size=4,
            ),
            json_values,
        ),
        "required": st.one_of(
            st.lists(st.sampled_from(["order_number", "a", "", "x"]), max_size=3),
            st.lists(text, max_size=3),
            json_values,
        ),
        "additionalProperties": st.one_of(st.booleans(), property_schemas),
        "anyOf": json_values,
        "enum": json_values,
    },
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into the document (dict keys and list indices), the root excluded."""
    found: list[tuple[Any, ...]] = []
    children: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    for key, child in children:
        path = (*prefix, key)
        found.append(path)
        found.extend(_paths(child, path))
    return found


PATHS = _paths(SPEC)
BIASED = [p for p in PATHS if p[:1] == ("tools",) or p[:1] == ("pipeline",)]


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    if draw(st.booleans()):
        spec["tools"][0]["parameters"] = draw(parameter_schemas)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(BIASED if draw(st.booleans()) else PATHS))
        parent: Any = spec
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, dict | list):  # a string indexed by an old list index
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(text)] = draw(json_values)
        elif isinstance(parent[last], list):
            parent[last].append(draw(json_values))
    return spec


def check_refusal(message: str) -> None:
    """Every line of a SpecError names a field: `spec.<path>: <message>`, and a bare `spec:`
    line (a rule across fields) names the fields in its message."""
    assert message, "empty refusal"
    for line in message.splitlines():
        match = LINE.match(line)
        assert match, f"refusal line does not start with a field path: {line!r}"
        if match.group(1) == "":
            # A rule across fields: the message must name at least one of them.
            words = set(re.findall(r"[A-Za-z]+", line.split(": ", 1)[1]))
            assert words & (SPEC_FIELDS | {"tool", "agent"}), f"names no field: {line!r}"


def check_accepted(spec: VoiceAgentSpec) -> None:
    """An accepted spec works: the operator renders it (or reports a ConfigError naming a field,
    its ConfigValid=False), the runtime loads the rendered config, and every tool schema is JSON
    Schema in the subset function-calling providers accept."""
    try:
        result = render.render_all(
            REF, spec, SETTINGS, livekit_data=LIVEKIT_DATA, secrets_hash="0", replicas=1
        )
    except ConfigError as error:  # the operator's ConfigValid=False: must name the field
        event("accepted, then ConfigValid=False")
        for line in str(error).splitlines():
            assert re.match(r"^[A-Za-z(][^:]*: \S", line), line
        return
    text_ = result.child("ConfigMap")["data"][render.CONFIG_KEY]
    config = parse_config(yaml.safe_load(text_))
    for tool in config.tools:
        parameters = tool.parameters
        Draft202012Validator.check_schema(parameters)
        assert parameters.get("type", "object") == "object"
        assert not set(PARAMETERS_TOP_LEVEL_FORBIDDEN) & set(parameters)
        properties = parameters.get("properties", {})
        assert isinstance(properties, dict)
        assert all(isinstance(p, dict) for p in properties.values())
        assert all(name in properties for name in parameters.get("required", []))
    for kind in ("stt", "llm", "tts"):
        assert getattr(config.pipeline, kind).model != ""
