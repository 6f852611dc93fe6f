"""The call record: one versioned JSON document per call, signed and delivered to the tenant.

This module is the record's schema and its signature, and nothing else: like `config` it depends
on pydantic and the standard library alone, because it is a contract too (between the runtime
and the tenant's receiver) and the operator's generator documents it field by field in
operator/API.md. The record is built in the call's job process (`recorder`), written to the
worker's spool and delivered by the worker's main process (`delivery`).

Wire format: camelCase keys, times as RFC 3339 UTC timestamps, durations in seconds. The body
is sent exactly as `serialize` returns it; the signature covers those bytes:

    X-VoiceFleet-Signature: sha256=<hex HMAC-SHA256 of the raw request body, keyed with the
                            bytes of the Secret key spec.callRecords.webhook.signingSecretRef>
    X-VoiceFleet-Delivery:  <recordId>   (the same on every retry: deduplicate on it)

`schemaVersion` changes only when a field changes meaning or goes away; fields may be added
within a version, so a receiver must ignore fields it does not know.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

SCHEMA_VERSION: Final = 1
SIGNATURE_HEADER: Final = "X-VoiceFleet-Signature"
DELIVERY_HEADER: Final = "X-VoiceFleet-Delivery"
SIGNATURE_PREFIX: Final = "sha256="

EndReason = Literal[
    "caller_hung_up",
    "agent_ended",
    "transferred",
    "error",
    "drained",
    "room_closed",
    "overflow",
    "max_duration",
    "silence_timeout",
]
END_REASONS: Final[dict[str, str]] = {
    "caller_hung_up": "the caller left the call (hung up, or closed the WebRTC session)",
    "agent_ended": "an agent ended the call with its end_call tool",
    "transferred": "an agent transferred the caller to a human (SIP REFER accepted)",
    "error": "the call failed (a provider error the session could not recover from, or the "
    "job crashed)",
    "drained": "the worker shut down and the call outlasted worker.drainTimeoutSeconds",
    "room_closed": "the call's LiveKit room was closed by someone else (e.g. deleted by API)",
    "overflow": "the caller was beyond capacity and got the overflow treatment (no agent)",
    "max_duration": "the call reached spec.callLimits.maxDurationSeconds: the caller was warned, "
    "then the agent said goodbye and hung up",
    "silence_timeout": "the caller said nothing for spec.callLimits.silenceTimeoutSeconds, nor "
    "after the agent's prompt: the agent said goodbye and hung up",
}


class RecordModel(BaseModel):
    """camelCase on the wire; unknown fields ignored when a receiver parses a newer record."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )


class AgentSpan(RecordModel):
    """One agent's part of the call: the entry agent first, then one span per handoff."""

    name: str
    """The configured agent's name (spec.agents[].name)."""
    started_at: datetime
    """When this agent took over the call."""
    ended_at: datetime | None = None
    """When it handed over, or the call ended."""


class Turn(RecordModel):
    """One utterance, in the order they were said."""

    speaker: Literal["agent", "caller"]
    """Who spoke: `agent` (synthesised speech) or `caller` (transcribed speech)."""
    agent: str | None = None
    """The agent speaking, or the agent the caller was talking to."""
    text: str
    """What was said: the agent's text as sent to TTS (cut where it was interrupted), or the
    caller's final transcript."""
    started_at: datetime
    """Start of the speech (for the caller, as detected by VAD)."""
    ended_at: datetime | None = None
    """End of the speech; absent when the pipeline did not report it."""
    interrupted: bool = False
    """The caller interrupted the agent before it finished this turn."""


class ToolCall(RecordModel):
    """One function tool the LLM called: a tenant webhook, an MCP tool, a handoff
    (transfer_to_<agent>), end_call or transfer_to_human. Only the LLM's arguments are kept:
    request headers (secret or not) and the tool's answer are never part of the record."""

    name: str
    """The tool's name as the LLM sees it."""
    agent: str | None = None
    """The agent whose LLM called it."""
    arguments: dict[str, Any] | str
    """The arguments the LLM chose (a JSON object; the raw text if it was not valid JSON)."""
    status: Literal["ok", "error"]
    """`error` when the tool failed (timeout, unreachable, non-2xx, exception)."""
    error: str | None = None
    """For a failed tool: the message the LLM was given (written by VoiceFleet, no secrets)."""
    started_at: datetime
    """When the LLM asked for the call."""
    latency_seconds: float | None = None
    """From the LLM's function call to the tool's result."""


class LlmUsage(RecordModel):
    """Language model usage of one provider and model."""

    provider: str
    """The configured provider (spec.pipeline.llm.provider)."""
    model: str
    """The model name the plugin reported."""
    prompt_tokens: int = 0
    """Input tokens (all requests of the call)."""
    cached_prompt_tokens: int = 0
    """Input tokens the provider served from its prompt cache (part of promptTokens)."""
    completion_tokens: int = 0
    """Output tokens."""


class TtsUsage(RecordModel):
    """Text-to-speech usage of one provider and model."""

    provider: str
    """The configured provider (spec.pipeline.tts.provider)."""
    model: str
    """The model name the plugin reported."""
    characters: int = 0
    """Characters sent to TTS."""
    audio_seconds: float = 0.0
    """Seconds of speech synthesised."""


class SttUsage(RecordModel):
    """Speech-to-text usage of one provider and model."""

    provider: str
    """The configured provider (spec.pipeline.stt.provider)."""
    model: str
    """The model name the plugin reported."""
    audio_seconds: float = 0.0
    """Seconds of caller audio transcribed."""


class Usage(RecordModel):
    """What the call consumed, per provider and model (livekit-agents' session usage)."""

    llm: list[LlmUsage] = []
    """LLM tokens."""
    tts: list[TtsUsage] = []
    """TTS characters and audio."""
    stt: list[SttUsage] = []
    """STT audio."""


class Latency(RecordModel):
    """How quickly the agent answered, as the worker measured it."""

    dispatch_to_greeting_seconds: float | None = None
    """From the job request reaching the worker to the first audio of the agent's greeting."""
    turn_p50_seconds: float | None = None
    """Median turn latency: end of the caller's speech to the start of the agent's reply
    (nearest-rank over the call's turns)."""
    turn_p95_seconds: float | None = None
    """95th percentile turn latency (nearest-rank; with few turns, the slowest)."""
    turns: int = 0
    """Agent replies with a measured turn latency."""


class Recording(RecordModel):
    """The call's audio in the tenant's bucket (spec.callRecords.recording): Ogg/Opus, stereo,
    the caller on the left channel and the agent on the right, on one timeline."""

    bucket: str
    """Bucket the object was uploaded to."""
    object_key: str
    """Object key (spec.callRecords.recording.prefix + the record's id)."""
    duration_seconds: float
    """Length of the recording."""
    content_type: str
    """Media type of the object (audio/ogg)."""
    channels: Literal["stereo-caller-left-agent-right"] = "stereo-caller-left-agent-right"
    """Channel layout: left the caller (as the agent heard them), right the agent."""
    started_at: datetime | None = None
    """When the recording starts (the agent's session starting, just before the greeting)."""


class CallRecord(RecordModel):
    """Everything about one call: who, when, which agents, what was said, which tools ran,
    what it cost and how it ended."""

    record_id: str
    """Unique id of this record; the same on every delivery attempt (X-VoiceFleet-Delivery),
    so a receiver deduplicates on it."""
    schema_version: int = SCHEMA_VERSION
    """Version of this document's shape (fields may be added within a version)."""
    tenant: str
    """The tenant: the VoiceAgent's namespace."""
    voice_agent: str
    """The VoiceAgent's name."""
    dispatch_name: str
    """The agent name the workers register with LiveKit (`<namespace>.<name>`)."""
    config_hash: str
    """Hash of the runtime config the call ran with (status.configHash of the VoiceAgent at the
    time; the pod template's voicefleet.dev/config-hash)."""
    job_id: str
    """LiveKit's job id of the call."""
    room: str
    """LiveKit room of the call."""
    direction: Literal["inbound", "outbound"] = "inbound"
    """inbound: someone called the agent (every call today)."""
    channel: Literal["phone", "webrtc"]
    """phone: the caller came in through SIP (livekit-sip); webrtc: a LiveKit participant."""
    caller_number: str | None = None
    """Phone calls: the caller's number (sip.phoneNumber)."""
    dialed_number: str | None = None
    """Phone calls: the number the caller dialled (sip.trunkPhoneNumber)."""
    sip_call_id: str | None = None
    """Phone calls: livekit-sip's call id (sip.callID)."""
    started_at: datetime
    """When the job request for the call reached the worker."""
    answered_at: datetime | None = None
    """When the agent's first audio (the greeting) started; absent if it never spoke."""
    ended_at: datetime
    """When the call ended for the agent."""
    duration_seconds: float
    """endedAt - startedAt."""
    end_reason: EndReason
    """How the call ended: caller_hung_up, agent_ended, transferred, error, drained,
    room_closed, overflow, max_duration or silence_timeout (see the table)."""
    end_detail: str = ""
    """livekit-agents' own words for the end (session close reason, job shutdown reason)."""
    agents: list[AgentSpan] = []
    """The path through the agents: the entry agent, then one entry per handoff."""
    transcript: list[Turn] = []
    """What was said, both ways, in order."""
    tool_calls: list[ToolCall] = []
    """Function tools the LLM called, in order."""
    usage: Usage = Usage()
    """Provider usage (tokens, characters, audio seconds) per provider and model."""
    latency: Latency = Latency()
    """Greeting and turn latency."""
    recording: Recording | None = None
    """The call's recording, when spec.callRecords.recording is set and the upload succeeded."""


# --- wire format and signature -----------------------------------------------------------------


def serialize(record: CallRecord) -> bytes:
    """The request body: compact JSON, camelCase, nulls left out."""
    return record.model_dump_json(by_alias=True, exclude_none=True).encode()


def sign(body: bytes, key: bytes) -> str:
    """The X-VoiceFleet-Signature value for `body`."""
    return SIGNATURE_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(body: bytes, key: bytes, signature: str) -> bool:
    """What a receiver does: recompute the HMAC over the raw body, compare in constant time."""
    return hmac.compare_digest(sign(body, key), signature.strip())


def utc(timestamp: float) -> datetime:
    """A time.time() value as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, tz=UTC)


def nearest_rank(values: list[float], quantile: float) -> float | None:
    """The nearest-rank percentile (no interpolation): a value that really occurred."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[rank - 1]
