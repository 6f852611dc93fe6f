"""The runtime config: the contract between the operator (which renders it) and the runtime.

The operator imports this module to validate and render a VoiceAgent into the file the runtime
loads, so it depends on the base dependencies only (pydantic, PyYAML, and jsonschema for tool
parameter schemas): the operator image must not pull in livekit-agents. Field names are
camelCase on the wire (the same spelling as the VoiceAgent spec) and snake_case in Python.

Secrets never appear in the config: a value that is secret names an environment variable
(`valueFromEnv`) that the pod gets from a Secret. Provider API keys come from the provider's
standard environment variables (OPENAI_API_KEY, DEEPGRAM_API_KEY, ELEVEN_API_KEY).

Cross-field rules are written twice on purpose: once as pydantic validators (the runtime and the
operator check them) and once as CEL (`x-kubernetes-validations`, so the API server rejects a bad
manifest before it reaches the operator). Both live next to each other so they stay in step.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails, PydanticCustomError

from voicefleet_runtime.admission import AdmissionSettings, OverflowOptions

CONFIG_PATH_ENV = "VOICEFLEET_CONFIG"
"""Environment variable naming the config file the runtime loads."""

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
E164_NUMBER = r"^\+[1-9][0-9]{6,14}$"
TOOL_NAME = r"^[a-z][a-z0-9_]{0,63}$"
ENV_VAR_NAME = r"^[A-Z_][A-Z0-9_]*$"
# A transfer target is an E.164 number or a SIP URI.
TRANSFER_TARGET = r"^(\+[1-9][0-9]{6,14}|sips?:[^\s]+)$"

PROVIDER_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "deepgram": "DEEPGRAM_API_KEY",
    "elevenlabs": "ELEVEN_API_KEY",
}
"""The environment variable each provider's livekit plugin reads its API key from."""


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class Model(BaseModel):
    """Base for every config and API model: camelCase on the wire, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
        use_attribute_docstrings=True,
    )

    def wire(self) -> dict[str, Any]:
        """The model as it is written to YAML/JSON (camelCase, defaults included)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} name {name!r} is defined twice; names must be unique")
        seen.add(name)


# --- tool parameter schemas -----------------------------------------------------------------
#
# A tool's `parameters` go to the LLM provider as the function's JSON Schema. A schema the
# provider refuses fails the whole request, mid-call, so it is checked here: against the JSON
# Schema metaschema (draft 2020-12, with a maintained validator) and against the subset that
# function-calling providers accept. The API server checks the part OpenAPI and CEL can express
# (PARAMETERS_SCHEMA); the operator reports the rest as ConfigValid=False naming the field.

PARAMETERS_MAX_PROPERTIES = 128
"""Most arguments one tool may declare (the CRD bounds its CEL rules' cost with it)."""
PARAMETERS_TOP_LEVEL_FORBIDDEN = ("anyOf", "oneOf", "allOf", "enum", "const", "not")
"""Keywords OpenAI (and OpenAI-compatible servers) refuse at the top of a function's schema."""
JSON_SCHEMA_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")

_METASCHEMA = Draft202012Validator(
    Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
)
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_$-]+$")

# CEL keywords are escaped as __keyword__ in Kubernetes' CEL (`const` is one).
_CEL_RESERVED = frozenset(
    "true false null in as break const continue else for function if import let loop package "
    "namespace return var void while".split()
)


def _cel_field(name: str) -> str:
    return f"__{name}__" if name in _CEL_RESERVED else name


PARAMETERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": True,
    "properties": {
        "type": {
            "type": "string",
            "enum": ["object"],
            "description": "Always object (the default): the arguments are its properties.",
        },
        "properties": {
            "type": "object",
            "maxProperties": PARAMETERS_MAX_PROPERTIES,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": True,
                "description": "The argument's JSON Schema, e.g. {type: string, description: ...}.",
            },
            "description": "The arguments: each argument's name mapped to its JSON Schema.",
        },
        "required": {
            "type": "array",
            "maxItems": PARAMETERS_MAX_PROPERTIES,
            "items": {"type": "string"},
            "x-kubernetes-list-type": "set",
            "description": "Names of the arguments (keys of properties) the LLM must supply.",
        },
        # Declared (typed all the way down: CEL cannot see untyped fields) only to be refused by
        # the rules below; a value of another type is refused by its type.
        **{
            keyword: {
                **(
                    {
                        "type": "array",
                        "maxItems": PARAMETERS_MAX_PROPERTIES,
                        "items": {"type": "object", "additionalProperties": True},
                    }
                    if keyword in ("anyOf", "oneOf", "allOf", "enum")
                    else {"type": "object", "additionalProperties": True}
                ),
                "description": "Not allowed at the top level (function-calling providers refuse "
                "it).",
            }
            for keyword in PARAMETERS_TOP_LEVEL_FORBIDDEN
        },
    },
    "x-kubernetes-validations": [
        {
            "rule": "!has(self.required) || "
            "self.required.all(r, has(self.properties) && r in self.properties)",
            "message": "every name in required must be a key of properties; add the argument "
            "to properties or remove it from required",
            "fieldPath": ".required",
        },
        *(
            {
                "rule": f"!has(self.{_cel_field(keyword)})",
                "message": f"{keyword} is not allowed at the top level of a tool's parameters "
                "(function-calling providers refuse it); describe the arguments with properties",
                "fieldPath": f".{keyword}",
            }
            for keyword in PARAMETERS_TOP_LEVEL_FORBIDDEN
        ),
    ],
}
"""What the API server checks of a tool's parameters (the rest is tool_parameters_problem's)."""


def _json_pointer(path: tuple[str | int, ...]) -> str:
    """`.name[0]["odd key"]`: odd keys (empty, spaces, dots) are quoted to stay readable."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def tool_parameters_problem(schema: Mapping[str, Any]) -> tuple[tuple[str | int, ...], str] | None:
    """The first reason a function-calling provider would refuse `schema`, as (path within the
    schema, message saying how to fix it); None when it is acceptable."""
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError):
        return (), (
            "must be plain JSON (mappings, lists, strings, finite numbers, booleans, null); "
            "quote dates and other values YAML would read as something else"
        )
    if schema.get("type", "object") != "object":
        return ("type",), (
            f"must be 'object' (got {schema['type']!r}): a tool's parameters are a JSON Schema "
            "object whose properties are the arguments"
        )
    for keyword in PARAMETERS_TOP_LEVEL_FORBIDDEN:
        if keyword in schema:
            return (keyword,), (
                f"{keyword} is not allowed at the top level of a tool's parameters "
                "(function-calling providers refuse it); describe the arguments with properties"
            )
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return ("properties",), (
            f"must be a mapping of argument name to JSON Schema (got {properties!r}), "
            "e.g. {order_number: {type: string}}"
        )
    if len(properties) > PARAMETERS_MAX_PROPERTIES:
        return ("properties",), (
            f"declares {len(properties)} arguments; at most {PARAMETERS_MAX_PROPERTIES} are allowed"
        )
    for name, prop in properties.items():
        if not isinstance(prop, Mapping):
            return ("properties", name), (
                f"must be a JSON Schema mapping (got {prop!r}), e.g. {{type: string, "
                "description: ...}}"
            )
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list):
            return ("required",), (
                f"must be a list of argument names from properties (got {required!r})"
            )
        if len(required) > PARAMETERS_MAX_PROPERTIES:
            return ("required",), f"lists more than {PARAMETERS_MAX_PROPERTIES} arguments"
        seen: set[str] = set()
        for index, name in enumerate(required):
            if not isinstance(name, str):
                return ("required", index), f"must be an argument name (a string), got {name!r}"
            if name not in properties:
                return ("required", index), (
                    f"{name!r} is not a key of properties; add the argument to properties or "
                    "remove it from required"
                )
            if name in seen:
                return ("required", index), f"{name!r} is listed twice; list each argument once"
            seen.add(name)
    error = best_match(_METASCHEMA.iter_errors(schema))
    if error is None:
        return None
    path = tuple(error.absolute_path)
    if path and path[-1] == "type" and error.validator == "anyOf":
        message = (
            f"{error.instance!r} is not a JSON Schema type; use one of "
            f"{', '.join(JSON_SCHEMA_TYPES)} (or a list of them)"
        )
    else:
        message = f"{error.message}; the parameters must be valid JSON Schema (draft 2020-12)"
    return path, message


def _tool_parameters(value: dict[str, Any]) -> dict[str, Any]:
    problem = tool_parameters_problem(value)
    if problem is not None:
        path, message = problem
        raise PydanticCustomError(
            "tool_parameters", "{message}", {"message": message, "path": _json_pointer(path)}
        )
    return value


# --- agents ---------------------------------------------------------------------------------


class AgentConfig(Model):
    """One LLM agent: its instructions, the tools it may call and the agents it may hand off to."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL)]
    """Agent name, a DNS-1123 label (lowercase letters, digits, '-'); referenced by `entry` and
    by other agents' `handoffs`."""

    instructions: Annotated[str, Field(min_length=1, max_length=32768)]
    """System instructions for the LLM. May refer to {caller_number} and {dialed_number}, which
    are filled in for phone calls."""

    greeting: Annotated[str | None, Field(max_length=2000)] = None
    """First sentence the agent says when it takes over the call; omit to let the LLM open."""

    tools: Annotated[
        list[Annotated[str, Field(pattern=TOOL_NAME, max_length=64)]], Field(max_length=64)
    ] = []
    """Names of tools from `tools` this agent may call."""

    handoffs: Annotated[
        list[Annotated[str, Field(pattern=DNS1123_LABEL, max_length=63)]], Field(max_length=32)
    ] = []
    """Names of agents this agent may hand the call to; the conversation and shared state are
    kept across a handoff."""

    @model_validator(mode="after")
    def _no_self_handoff(self) -> Self:
        if self.name in self.handoffs:
            raise ValueError(f"agent {self.name!r} lists itself in handoffs; remove it")
        return self


# --- pipeline -------------------------------------------------------------------------------


class SttConfig(Model):
    """Speech-to-text provider and model."""

    provider: Literal["deepgram", "openai"] = "deepgram"
    """STT provider; its API key comes from the provider's environment variable."""
    model: Annotated[str, Field(min_length=1, max_length=128)] = "nova-3"
    """Provider model name, e.g. nova-3 (Deepgram) or gpt-4o-transcribe (OpenAI)."""
    language: Annotated[str, Field(min_length=2, max_length=16)] = "en"
    """BCP-47 language code of the callers' speech, or "multi" where the model supports it."""
    base_url: Annotated[str | None, Field(pattern=r"^(https?|wss?)://")] = None
    """Override the provider's endpoint (self-hosted or test servers)."""


class LlmConfig(Model):
    """Language model provider and model (OpenAI-compatible Chat Completions)."""

    provider: Literal["openai"] = "openai"
    """LLM provider; any OpenAI-compatible server works through `baseUrl`."""
    model: Annotated[str, Field(min_length=1, max_length=128)] = "gpt-4o-mini"
    """Model name."""
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    """Sampling temperature; omit for the provider's default."""
    base_url: Annotated[str | None, Field(pattern=r"^https?://")] = None
    """Override the provider's endpoint (self-hosted or test servers)."""


class TtsConfig(Model):
    """Text-to-speech provider, model and voice."""

    provider: Literal["elevenlabs", "openai"] = "elevenlabs"
    """TTS provider; its API key comes from the provider's environment variable."""
    model: Annotated[str | None, Field(min_length=1, max_length=128)] = None
    """Provider model, e.g. eleven_flash_v2_5 or gpt-4o-mini-tts; omit for the plugin default."""
    voice: Annotated[str | None, Field(min_length=1, max_length=128)] = None
    """Voice ID (ElevenLabs) or voice name (OpenAI); omit for the plugin default."""
    base_url: Annotated[str | None, Field(pattern=r"^(https?|wss?)://")] = None
    """Override the provider's endpoint (self-hosted or test servers)."""


class VadConfig(Model):
    """Voice activity detection."""

    provider: Literal["silero"] = "silero"
    """VAD implementation (Silero, runs locally on CPU)."""
    activation_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Speech probability above which audio counts as speech."""
    min_silence_seconds: Annotated[float, Field(gt=0, le=5)] = 0.55
    """Silence that ends a speech segment."""


class TurnDetectionConfig(Model):
    """How the end of the caller's turn is decided."""

    mode: Literal["multilingual", "english", "vad", "stt", "manual"] = "vad"
    """multilingual/english use the LiveKit turn-detector model (falls back to vad, with a
    warning and a metric, when the model files are missing); vad uses silence; stt uses the STT
    provider's endpointing; manual leaves it to the application."""


class NoiseCancellationConfig(Model):
    """Noise cancellation applied to the caller's audio."""

    mode: Literal["none", "bvc", "bvc-telephony"] = "none"
    """bvc and bvc-telephony need LiveKit Cloud's enhanced noise cancellation: a self-hosted
    livekit-server does not authorize the filter (the audio goes through unfiltered), so the
    operator refuses them unless the platform's LiveKit is LiveKit Cloud (livekit.cloud)."""


class InterruptionsConfig(Model):
    """Whether and when the caller can interrupt the agent."""

    enabled: bool = True
    """Let the caller interrupt the agent's speech."""
    min_duration_seconds: Annotated[float, Field(ge=0, le=10)] = 0.5
    """Speech needed before the agent stops talking."""
    min_words: Annotated[int, Field(ge=0, le=20)] = 0
    """Words needed (from STT) before the agent stops talking."""


class EndpointingConfig(Model):
    """Delays around the end of the caller's turn."""

    min_delay_seconds: Annotated[float, Field(ge=0, le=10)] = 0.5
    """Minimum silence after speech before the agent answers."""
    max_delay_seconds: Annotated[float, Field(ge=0, le=30)] = 3.0
    """Maximum wait when the turn detector thinks the caller will go on."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_delay_seconds > self.max_delay_seconds:
            raise ValueError("minDelaySeconds must not exceed maxDelaySeconds")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.minDelaySeconds <= self.maxDelaySeconds",
                    "minDelaySeconds must not exceed maxDelaySeconds",
                )
            ]
        }
    )


class RealtimeTurnDetection(Model):
    """How the realtime model decides the caller finished speaking (on the provider's server)."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    """server_vad: silence after speech; semantic_vad: a model judges whether the caller is done
    (`eagerness`)."""
    threshold: Annotated[float | None, Field(ge=0, le=1)] = None
    """server_vad: speech probability above which audio counts as speech (provider default
    0.5)."""
    prefix_padding_ms: Annotated[int | None, Field(ge=0, le=5000)] = None
    """server_vad: audio kept before detected speech (provider default 300)."""
    silence_duration_ms: Annotated[int | None, Field(ge=0, le=10000)] = None
    """server_vad: silence that ends the caller's turn (provider default 500)."""
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    """semantic_vad: how soon the model answers (provider default auto)."""
    interrupt_response: bool = True
    """The caller's speech interrupts the agent."""

    @model_validator(mode="after")
    def _options_of_the_type(self) -> Self:
        server_only = ("threshold", "prefix_padding_ms", "silence_duration_ms")
        if self.type == "semantic_vad":
            for name in server_only:
                if getattr(self, name) is not None:
                    raise ValueError(f"{to_camel(name)} applies to type server_vad only")
        elif self.eagerness is not None:
            raise ValueError("eagerness applies to type semantic_vad only")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.type) ? self.type : 'server_vad') != 'semantic_vad' || "
                    "(!has(self.threshold) && !has(self.prefixPaddingMs) && "
                    "!has(self.silenceDurationMs))",
                    "threshold, prefixPaddingMs and silenceDurationMs apply to type server_vad "
                    "only",
                ),
                cel(
                    "(has(self.type) ? self.type : 'server_vad') == 'semantic_vad' || "
                    "!has(self.eagerness)",
                    "eagerness applies to type semantic_vad only",
                ),
            ]
        }
    )


class RealtimeConfig(Model):
    """A speech-to-speech model (OpenAI Realtime API) in place of STT, LLM and TTS: it hears the
    caller, decides the end of turn, calls tools and speaks."""

    provider: Literal["openai"] = "openai"
    """Realtime provider; any server speaking the OpenAI Realtime protocol works through
    `baseUrl`. Its API key comes from OPENAI_API_KEY."""
    model: Annotated[str, Field(min_length=1, max_length=128)] = "gpt-realtime"
    """Model name."""
    voice: Annotated[str | None, Field(min_length=1, max_length=64)] = None
    """Voice (e.g. marin, alloy); omit for the plugin default."""
    modalities: Annotated[list[Literal["audio", "text"]], Field(min_length=1, max_length=1)] = [
        "audio"
    ]
    """["audio"]: the model speaks; ["text"]: it writes (needs a TTS, not offered here)."""
    turn_detection: RealtimeTurnDetection = RealtimeTurnDetection()
    """End-of-turn detection on the provider's server."""
    input_transcription_model: Annotated[str | None, Field(min_length=1, max_length=128)] = (
        "gpt-4o-mini-transcribe"
    )
    """Model that transcribes the caller for transcripts and call records; null for none."""
    speed: Annotated[float | None, Field(ge=0.25, le=1.5)] = None
    """Speaking rate; omit for the provider default."""
    base_url: Annotated[str | None, Field(pattern=r"^(https?|wss?)://")] = None
    """Override the provider's endpoint (self-hosted or test servers)."""

    @model_validator(mode="after")
    def _audio_only(self) -> Self:
        if self.modalities != ["audio"]:
            raise ValueError(
                "modalities: only [audio] is offered (a text-only realtime model needs a TTS)"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.modalities) || self.modalities == ['audio']",
                    "modalities: only [audio] is offered (a text-only realtime model needs a TTS)",
                    ".modalities",
                )
            ]
        }
    )


def _at_defaults(part: str, model: type[Model]) -> str:
    """CEL: `self.<part>` has every field at its default (the API server fills defaults in
    before it validates, so "left out" and "set to the default" look the same)."""
    checks = []
    for name, field in model.model_fields.items():
        wire = field.alias or to_camel(name)
        if field.default is None:
            checks.append(f"!has(self.{part}.{wire})")
        else:
            checks.append(f"self.{part}.{wire} == {json.dumps(field.default)}")
    return f"(!has(self.{part}) || ({' && '.join(checks)}))"


def _realtime_rule() -> JsonDict:
    """CEL twin of PipelineConfig._realtime_or_parts."""
    parts = " && ".join(
        _at_defaults(part, model)
        for part, model in (("stt", SttConfig), ("llm", LlmConfig), ("tts", TtsConfig))
    )
    return cel(
        f"!has(self.realtime) || ({parts})",
        "realtime replaces stt, llm and tts: leave those out (or at their defaults), or remove "
        "realtime",
        ".realtime",
    )


class PipelineConfig(Model):
    """The speech pipeline: STT, LLM, TTS, VAD, turn detection and conversation behaviour."""

    stt: SttConfig = SttConfig()
    """Speech-to-text."""
    llm: LlmConfig = LlmConfig()
    """Language model."""
    tts: TtsConfig = TtsConfig()
    """Text-to-speech."""
    vad: VadConfig = VadConfig()
    """Voice activity detection."""
    turn_detection: TurnDetectionConfig = TurnDetectionConfig()
    """End-of-turn detection."""
    noise_cancellation: NoiseCancellationConfig = NoiseCancellationConfig()
    """Noise cancellation of the caller's audio."""
    interruptions: InterruptionsConfig = InterruptionsConfig()
    """Interruption behaviour."""
    endpointing: EndpointingConfig = EndpointingConfig()
    """End-of-turn delays."""
    preemptive_generation: bool = False
    """Start the LLM reply before the end of turn is final (lower latency, more tokens)."""
    user_away_timeout_seconds: Annotated[float | None, Field(gt=0, le=3600)] = 15.0
    """Silence after which the caller counts as away; omit to disable."""
    realtime: RealtimeConfig | None = None
    """A speech-to-speech model instead of stt, llm and tts (leave those at their defaults:
    a spec that customises both is refused). Choose it for the most natural turn-taking and
    the lowest latency on one provider; choose stt/llm/tts to pick each provider, keep costs
    per part down, or use any OpenAI-compatible LLM."""

    model_config = ConfigDict(
        json_schema_extra=lambda schema: schema.setdefault(
            "x-kubernetes-validations", [_realtime_rule()]
        )
    )

    @model_validator(mode="after")
    def _realtime_or_parts(self) -> Self:
        if self.realtime is None:
            return self
        customised = [
            name
            for name, default in (("stt", SttConfig()), ("llm", LlmConfig()), ("tts", TtsConfig()))
            if getattr(self, name) != default
        ]
        if customised:
            raise ValueError(
                "realtime replaces stt, llm and tts, but "
                + ", ".join(f"pipeline.{name}" for name in customised)
                + " is set too; remove "
                + ("it" if len(customised) == 1 else "them")
                + " or remove pipeline.realtime"
            )
        return self


# --- call limits and DTMF -------------------------------------------------------------------

WARN_BEFORE_DEFAULT_SECONDS = 30
"""Default lead of the duration warning: the line takes 3-5 s to say, which leaves the caller
about 25 s, one more question and its answer, to finish before the polite end."""
MIN_SECONDS_BEFORE_WARNING = 15
"""maxDurationSeconds must leave at least this much before the warning: dispatch and greeting
take about 2-8 s, and a warning heard during or right after the greeting makes no sense. How
long a greeting lasts depends on the TTS voice, so the rule is this fixed floor, not a guess."""


class CallLimitsConfig(Model):
    """Bounds on each call: how long it may last and how long the caller may stay silent.

    Both end the call politely: the agent says its line (not cut by the caller), then hangs up
    (a phone caller gets a BYE), and the call record's endReason says which limit ended it
    (max_duration or silence_timeout)."""

    max_duration_seconds: Annotated[int | None, Field(ge=20, le=86400)] = None
    """Longest a call may last, counted from when the agent's session starts (the caller is
    connected). At maxDurationSeconds - warnBeforeSeconds the agent says `warningMessage`;
    at maxDurationSeconds it stops what it is saying, says `endMessage` and hangs up. Must be
    at least warnBeforeSeconds + 15 (room for the greeting before the warning). Omit for no
    limit."""
    warn_before_seconds: Annotated[int, Field(ge=5, le=600)] = WARN_BEFORE_DEFAULT_SECONDS
    """How long before the end the caller is warned (default 30 s: the warning takes 3-5 s to
    say and leaves about one more question and its answer)."""
    warning_message: Annotated[str, Field(min_length=1, max_length=500)] = (
        "Just so you know, we need to wrap up: this call will end in about {seconds} seconds."
    )
    """What the agent says warnBeforeSeconds before the end; {seconds} is replaced by
    warnBeforeSeconds. Said after the sentence in progress."""
    end_message: Annotated[str, Field(min_length=1, max_length=500)] = (
        "We have reached the time limit for this call. Thank you for calling, goodbye."
    )
    """What the agent says before it hangs up at maxDurationSeconds."""
    silence_timeout_seconds: Annotated[float | None, Field(ge=3, le=3600)] = None
    """How long the caller may say nothing (while the agent is listening too) before the agent
    asks `silencePrompt`; after as long again without a word (or a key press) it says
    `silenceEndMessage` and hangs up. It is the session's user-away timeout (it replaces
    pipeline.userAwayTimeoutSeconds): the caller turns `away` after it. Omit to keep callers on
    the line however long they are silent."""
    silence_prompt: Annotated[str, Field(min_length=1, max_length=500)] = "Are you still there?"
    """What the agent asks a silent caller."""
    silence_end_message: Annotated[str, Field(min_length=1, max_length=500)] = (
        "I haven't heard from you, so I'll end the call now. Goodbye."
    )
    """What the agent says before it hangs up on a caller who stayed silent after the prompt."""

    @model_validator(mode="after")
    def _room_before_warning(self) -> Self:
        maximum = self.max_duration_seconds
        if maximum is not None and maximum < self.warn_before_seconds + MIN_SECONDS_BEFORE_WARNING:
            raise ValueError(
                f"maxDurationSeconds ({maximum}) must be at least warnBeforeSeconds "
                f"({self.warn_before_seconds}) + {MIN_SECONDS_BEFORE_WARNING}: the warning would "
                "come during or right after the greeting; raise maxDurationSeconds or lower "
                "warnBeforeSeconds"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.maxDurationSeconds) || self.maxDurationSeconds >= "
                    f"(has(self.warnBeforeSeconds) ? self.warnBeforeSeconds : "
                    f"{WARN_BEFORE_DEFAULT_SECONDS}) + {MIN_SECONDS_BEFORE_WARNING}",
                    "maxDurationSeconds must be at least warnBeforeSeconds + "
                    f"{MIN_SECONDS_BEFORE_WARNING}: the warning would come during or right "
                    "after the greeting",
                    ".maxDurationSeconds",
                )
            ]
        }
    )

    def warning_text(self) -> str:
        return self.warning_message.replace("{seconds}", str(self.warn_before_seconds))


DTMF_DIGITS = r"^[0-9*#A-D]{1,32}$"


class DtmfConfig(Model):
    """Phone keypad digits (DTMF, RFC 4733 events through livekit-sip), both ways."""

    inter_digit_timeout_seconds: Annotated[float, Field(ge=0.3, le=10)] = 2.0
    """Digits the caller presses are gathered until they pause this long (or press
    `terminator`), then reach the LLM as one caller message, e.g. `[The caller pressed the
    phone keys: 1234]`."""
    terminator: Literal["#", "*", "none"] = "#"
    """A key that ends the entry at once (it is passed on with the digits); `none`: only the
    pause ends it."""
    interrupt: bool = True
    """A key press interrupts the agent's speech (as in phone menus)."""
    send_tool: bool = True
    """Agents get a `send_dtmf` tool that presses keys on the call (phone menus, PINs); each
    digit goes to livekit-sip, which sends it to the caller's side as an RFC 4733 event."""


# --- tools ----------------------------------------------------------------------------------
# --- tools ----------------------------------------------------------------------------------


class HttpHeader(Model):
    """One HTTP header: a literal value, or a value read from an environment variable."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9-]+$")]
    """Header name."""
    value: Annotated[str | None, Field(max_length=4096)] = None
    """Literal value (not secret)."""
    value_from_env: Annotated[str | None, Field(pattern=ENV_VAR_NAME)] = None
    """Environment variable holding the (secret) value; the operator fills it from a Secret."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.value is None) == (self.value_from_env is None):
            raise ValueError(f"header {self.name!r}: set exactly one of value or valueFromEnv")
        return self


class HttpEndpoint(Model):
    """Where and how a webhook tool is called."""

    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)]
    """Webhook URL; the tool's arguments are sent as JSON (query string for GET), and headers
    X-VoiceFleet-Caller-Number, X-VoiceFleet-Dialed-Number (phone calls), X-VoiceFleet-Room and
    X-VoiceFleet-Agent say which call asks."""
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    """HTTP method."""
    timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Time after which the call fails and the agent says it could not get an answer."""
    headers: Annotated[list[HttpHeader], Field(max_length=32)] = []
    """Extra headers, e.g. an Authorization header from a Secret."""


class WebhookTool(Model):
    """A tenant webhook exposed to the LLM as a function tool."""

    name: Annotated[str, Field(pattern=TOOL_NAME, max_length=64)]
    """Function name the LLM sees (lowercase, digits, underscores)."""
    description: Annotated[str, Field(min_length=1, max_length=4096)]
    """What the tool does and when to call it; the LLM reads this."""
    parameters: Annotated[
        dict[str, Any],
        AfterValidator(_tool_parameters),
        WithJsonSchema(PARAMETERS_SCHEMA),
    ] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    """JSON Schema (type object, draft 2020-12) of the arguments the LLM must supply, in the
    subset function-calling providers accept: no anyOf, oneOf, allOf, enum, const or not at the
    top level; properties maps each argument to its schema; required lists names from
    properties."""
    http: HttpEndpoint
    """The webhook to call."""


class McpServerConfig(Model):
    """A Model Context Protocol server whose tools are offered to every agent."""

    name: Annotated[str, Field(pattern=DNS1123_LABEL, max_length=63)]
    """Name for logs and metrics."""
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)]
    """Endpoint of the MCP server, for the transport below."""
    transport: Literal["streamable-http", "sse"] = "streamable-http"
    """streamable-http (MCP's standard HTTP transport) or sse (its legacy transport)."""
    allowed_tools: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=128)
    ] = []
    """Offer the LLM only these of the server's tools; empty offers all of them."""
    timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Per-request timeout. A call's greeting (and each handoff) waits for the connection to
    the server, up to this long, so keep it short."""
    headers: Annotated[list[HttpHeader], Field(max_length=32)] = []
    """Extra headers, e.g. an Authorization header from a Secret."""


# --- call records ---------------------------------------------------------------------------


class CallRecordWebhookBase(Model):
    """Where each call's record is delivered: one signed POST per call (see callrecords.py)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+[^\s]*$", max_length=2048)]
    """Receiver URL (http or https). Each call's record is POSTed as JSON with headers
    X-VoiceFleet-Signature (sha256=<hex HMAC-SHA256 of the body>) and X-VoiceFleet-Delivery
    (the recordId, the same on every retry)."""
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 10.0
    """Time to wait for the receiver's answer to one attempt."""
    retry_for_seconds: Annotated[int, Field(ge=0, le=86400)] = 3600
    """How long after the call a record is retried (timeouts, connection errors, 408, 429, 5xx;
    exponential backoff from 1 s up to 60 s between attempts). Other 4xx answers are not
    retried. A record that still fails is dropped, logged with the last status and counted as
    failed."""


class CallRecordWebhook(CallRecordWebhookBase):
    """Runtime side: the signing key comes from an environment variable."""

    signing_key_from_env: Annotated[str, Field(pattern=ENV_VAR_NAME)]
    """Environment variable holding the HMAC signing key; the operator fills it from
    spec.callRecords.webhook.signingSecretRef."""


S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class CallRecordingBase(Model):
    """Where call recordings go: an S3-compatible bucket (AWS S3, MinIO, versitygw, ...)."""

    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+/?$", max_length=2048)]
    """The S3 endpoint, scheme and host only, e.g. https://s3.eu-west-1.amazonaws.com or
    http://minio.storage:9000; objects are addressed path-style (<endpoint>/<bucket>/<key>)."""
    bucket: Annotated[str, Field(pattern=S3_BUCKET, min_length=3, max_length=63)]
    """Bucket the recordings are written to (it must exist)."""
    prefix: Annotated[str, Field(pattern=r"^([^/\s][^\s]*)?$", max_length=512)] = ""
    """Prepended to each object's key (<prefix><recordId>.ogg), e.g. "calls/"."""
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", min_length=1, max_length=64)] = (
        "us-east-1"
    )
    """Region the requests are signed for (SigV4); S3-compatible servers accept us-east-1."""


class CallRecordingConfig(CallRecordingBase):
    """Runtime side: the bucket's credentials come from environment variables."""

    access_key_id_from_env: Annotated[str, Field(pattern=ENV_VAR_NAME)]
    """Environment variable holding the access key id."""
    secret_access_key_from_env: Annotated[str, Field(pattern=ENV_VAR_NAME)]
    """Environment variable holding the secret access key."""


class CallRecordsConfig(Model):
    """What happens to each call's record."""

    webhook: CallRecordWebhook | None = None
    """Deliver each call's record to this webhook; omit to keep no records."""
    recording: CallRecordingConfig | None = None
    """Record each call's audio (stereo Ogg/Opus: caller left, agent right) and upload it to this
    bucket when the call ends; omit to record nothing."""


# --- telephony and worker -------------------------------------------------------------------


class TelephonyOptions(Model):
    """What the runtime needs to know about phone calls (the SIP trunk itself is operator-side)."""

    numbers: Annotated[list[Annotated[str, Field(pattern=E164_NUMBER)]], Field(max_length=100)] = []
    """Phone numbers (E.164) that reach this agent."""
    transfer_to: Annotated[str | None, Field(pattern=TRANSFER_TARGET)] = None
    """E.164 number or SIP URI; when set, agents get a transfer-to-human tool (SIP REFER)."""


class WorkerSettings(Model):
    """How one worker process takes jobs (calls)."""

    jobs_per_worker: Annotated[int, Field(ge=1, le=100)] = 10
    """Hard cap of simultaneous calls per worker; load = active jobs / jobsPerWorker."""
    load_threshold: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Load above which the worker reports itself full to LiveKit."""
    idle_processes: Annotated[int, Field(ge=0, le=20)] = 2
    """Pre-warmed job processes, to answer new calls quickly."""
    job_memory_warn_mb: Annotated[int, Field(ge=64, le=16384, alias="jobMemoryWarnMB")] = 500
    """Job process memory (MB) above which a warning is logged."""
    job_memory_limit_mb: Annotated[int, Field(ge=0, le=16384, alias="jobMemoryLimitMB")] = 1000
    """Job process memory (MB) above which the job is killed; 0 disables the limit."""
    drain_timeout_seconds: Annotated[int, Field(ge=0, le=86400)] = 1800
    """On shutdown, how long running calls may go on before the worker exits."""
    health_port: Annotated[int, Field(ge=1024, le=65535)] = 8081
    """Port of the worker's HTTP health endpoint (and /worker status)."""
    metrics_port: Annotated[int, Field(ge=1024, le=65535)] = 9100
    """Port of the Prometheus /metrics endpoint and of the readiness probe's /ready."""

    @model_validator(mode="after")
    def _memory_order(self) -> Self:
        if self.job_memory_limit_mb and self.job_memory_warn_mb > self.job_memory_limit_mb:
            raise ValueError(
                f"jobMemoryWarnMB ({self.job_memory_warn_mb}) must not exceed jobMemoryLimitMB "
                f"({self.job_memory_limit_mb}); raise the limit or lower the warning"
            )
        if self.health_port == self.metrics_port:
            raise ValueError("healthPort and metricsPort must differ")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.jobMemoryLimitMB == 0 || self.jobMemoryWarnMB <= self.jobMemoryLimitMB",
                    "jobMemoryWarnMB must not exceed jobMemoryLimitMB",
                    ".jobMemoryWarnMB",
                ),
                cel(
                    "self.healthPort != self.metricsPort",
                    "healthPort and metricsPort must differ",
                ),
            ]
        }
    )


# --- the whole config -----------------------------------------------------------------------


class AgentsSection(Model):
    """Agents, tools and pipeline: shared by the VoiceAgent spec and the runtime config."""

    agents: Annotated[list[AgentConfig], Field(min_length=1, max_length=16)]
    """The LLM agents; `entry` names the one that takes the call."""
    entry: Annotated[str, Field(pattern=DNS1123_LABEL, max_length=63)]
    """Name of the agent that answers the call."""
    pipeline: PipelineConfig = PipelineConfig()
    """STT, LLM, TTS, VAD and turn-taking."""
    call_limits: CallLimitsConfig | None = None
    """Longest call and longest silence, each ended politely; omit for no limits."""
    dtmf: DtmfConfig | None = None
    """Phone keypad digits: what the caller presses reaches the LLM, and agents may press keys
    (send_dtmf). Phone calls only: needs `telephony`. Omit to ignore key presses."""

    @model_validator(mode="after")
    def _references(self) -> Self:
        names = [agent.name for agent in self.agents]
        _unique(names, "agent")
        if self.entry not in names:
            raise ValueError(f"entry {self.entry!r} names no agent; use one of {names}")
        for index, agent in enumerate(self.agents):
            for target in agent.handoffs:
                if target not in names:
                    raise ValueError(
                        f"agents[{index}].handoffs: {target!r} names no agent; use one of {names}"
                    )
        return self


def validate_tool_references(agents: list[AgentConfig], tools: list[str]) -> None:
    """Every tool an agent lists must be defined; raises ValueError naming the agent."""
    _unique(tools, "tool")
    for index, agent in enumerate(agents):
        for tool in agent.tools:
            if tool not in tools:
                raise ValueError(
                    f"agents[{index}].tools: {tool!r} is not defined in tools; "
                    f"define it or use one of {tools}"
                )


class RuntimeConfig(AgentsSection):
    """Everything one VoiceAgent's workers need, rendered by the operator into a ConfigMap."""

    tenant: Annotated[str, Field(pattern=DNS1123_LABEL, max_length=63)]
    """Tenant (the VoiceAgent's namespace); labels every metric."""
    name: Annotated[str, Field(pattern=DNS1123_LABEL, max_length=63)]
    """The VoiceAgent's name."""
    dispatch_name: Annotated[str, Field(min_length=1, max_length=128)]
    """Agent name registered with LiveKit; unique across tenants."""
    tools: Annotated[list[WebhookTool], Field(max_length=64)] = []
    """Webhook tools available to agents that list them."""
    mcp_servers: Annotated[list[McpServerConfig], Field(max_length=16)] = []
    """MCP servers whose tools every agent may call."""
    admission: AdmissionSettings = AdmissionSettings()
    """How many agent calls each worker admits (the operator's share of the caps)."""
    overflow: OverflowOptions = OverflowOptions()
    """What a caller beyond capacity gets."""
    telephony: TelephonyOptions = TelephonyOptions()
    """Phone numbers and transfer target."""
    worker: WorkerSettings = WorkerSettings()
    """Job capacity, memory limits, drain and ports."""
    call_records: CallRecordsConfig | None = None
    """Call records: where each call's record is delivered; omit for none."""

    @model_validator(mode="after")
    def _tool_references(self) -> Self:
        validate_tool_references(self.agents, [tool.name for tool in self.tools])
        _unique([server.name for server in self.mcp_servers], "MCP server")
        return self

    def agent(self, name: str) -> AgentConfig:
        return next(agent for agent in self.agents if agent.name == name)

    def secret_env_vars(self) -> list[str]:
        """Environment variables the config refers to, which must be set at start-up."""
        headers = [h for tool in self.tools for h in tool.http.headers]
        headers += [h for server in self.mcp_servers for h in server.headers]
        env = [h.value_from_env for h in headers if h.value_from_env]
        if self.records_webhook is not None:
            env.append(self.records_webhook.signing_key_from_env)
        if self.recording is not None:
            env.append(self.recording.access_key_id_from_env)
            env.append(self.recording.secret_access_key_from_env)
        return sorted(set(env))

    @property
    def records_webhook(self) -> CallRecordWebhook | None:
        """Where call records go, or None when the VoiceAgent keeps none."""
        return self.call_records.webhook if self.call_records is not None else None

    @property
    def recording(self) -> CallRecordingConfig | None:
        """Where call recordings go, or None when calls are not recorded."""
        return self.call_records.recording if self.call_records is not None else None

    def provider_key_env_vars(self) -> list[str]:
        """Provider API key variables the pipeline's providers need."""
        pipeline = self.pipeline
        providers = {pipeline.stt.provider, pipeline.llm.provider, pipeline.tts.provider}
        if pipeline.realtime is not None:
            providers = {pipeline.realtime.provider}
        return sorted(PROVIDER_KEY_ENV[p] for p in providers if p in PROVIDER_KEY_ENV)


# --- loading --------------------------------------------------------------------------------


class ConfigError(Exception):
    """Invalid runtime config; the message names each bad field and how to fix it."""


def _without(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Delete the mapping key at `loc` inside `data` (in place); False if it is not there."""
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if not loc or not isinstance(node, dict) or loc[-1] not in node:
        return False
    del node[loc[-1]]
    return True


def all_errors(
    model: type[BaseModel], data: Mapping[str, Any], error: ValidationError, rounds: int = 4
) -> list[ErrorDetails]:
    """Every problem of `data`, not only the first layer.

    Pydantic skips a model's cross-field checks (entry names an agent, tool references, ...)
    once one of its fields is invalid, so a typo would hide them and the tenant would fix one
    error per try. Each round leaves out the fields already reported (their defaults, if any,
    stand in) and validates again; a field missing only because it was left out is not a new
    problem."""
    found = list(error.errors())
    seen = {(tuple(e["loc"]), e["msg"]) for e in found}
    removed: set[tuple[int | str, ...]] = set()
    pruned = copy.deepcopy(dict(data))
    for _ in range(rounds):
        progress = False
        for item in found:
            loc = tuple(item["loc"])
            if loc not in removed and _without(pruned, loc):
                removed.add(loc)
                progress = True
        if not progress:
            break
        try:
            model.model_validate(pruned)
            break
        except ValidationError as again:
            new = [
                e
                for e in again.errors()
                if (tuple(e["loc"]), e["msg"]) not in seen
                and not (e["type"] == "missing" and tuple(e["loc"]) in removed)
            ]
        if not new:
            break
        seen.update((tuple(e["loc"]), e["msg"]) for e in new)
        found += new
    return found


def describe_validation_error(error: ValidationError | list[ErrorDetails], prefix: str = "") -> str:
    """One line per problem: `field.path: message` (camelCase paths, as written in YAML)."""
    lines = []
    for item in error.errors() if isinstance(error, ValidationError) else error:
        path = _json_pointer(tuple(item["loc"]))
        if item["type"] == "tool_parameters":  # where inside the tool's JSON Schema
            path += (item.get("ctx") or {}).get("path", "")
        where = (prefix + path).removeprefix(".") or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling (fields are camelCase)"
        elif item["type"] == "missing":
            message = "required field is missing; add it"
        elif item["type"] == "string_too_short" and (item.get("ctx") or {}).get("min_length") == 1:
            message = "must not be empty; give a value (or leave an optional field out)"
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any]) -> RuntimeConfig:
    """Validate an already-parsed config document."""
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as error:
        errors = all_errors(RuntimeConfig, data, error)
        raise ConfigError(describe_validation_error(errors)) from None


def load_config(path: str | os.PathLike[str]) -> RuntimeConfig:
    """Read and validate the config file (YAML or JSON)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigError(
            f"cannot read config file {file} ({error.strerror}); set {CONFIG_PATH_ENV} "
            "to the path of the rendered config"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not valid YAML/JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must contain a mapping at the top level")
    return parse_config(data)


def missing_environment(config: RuntimeConfig, environ: Mapping[str, str]) -> list[str]:
    """Names of the environment variables the config needs but the process lacks."""
    needed = config.secret_env_vars() + config.provider_key_env_vars()
    return [name for name in needed if not environ.get(name)]


def load_from_environment(environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Load the config named by VOICEFLEET_CONFIG and check its secrets are present."""
    environ = os.environ if environ is None else environ
    path = environ.get(CONFIG_PATH_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_PATH_ENV} is not set; set it to the path of the config file")
    config = load_config(path)
    missing = missing_environment(config, environ)
    if missing:
        raise ConfigError(
            "environment variables required by the config are not set: "
            + ", ".join(missing)
            + " (provide them from a Secret: spec.secretRefs or the header's secretKeyRef)"
        )
    return config
