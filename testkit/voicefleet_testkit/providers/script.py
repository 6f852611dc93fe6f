"""What the provider servers answer (scripted replies, default policies) and what they record.

Every server (OpenAI, Deepgram, ElevenLabs) shares one `ProviderState`, so a test scripts the
conversation once and reads every request, whichever provider the runtime is configured for.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web

DEFAULT_GREETING_REPLY = "Hello! How can I help you today?"
DEFAULT_TRANSCRIPT = "Hello, can you hear me?"
# Tool results are read back by the default reply; cap them so TTS stays short.
MAX_TOOL_RESULT_CHARS = 300

RequestKind = Literal["chat", "tts", "stt", "realtime"]
REQUEST_KINDS: tuple[RequestKind, ...] = ("chat", "tts", "stt", "realtime")
LastRole = Literal["any", "user", "tool"]


class ScriptError(ValueError):
    """A scripted reply or transcript is malformed; the message names the field."""


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """A function call the scripted LLM makes; `arguments` is sent as a JSON string."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_tool_call_id)


@dataclass
class LLMReply:
    """One scripted chat completion.

    `text` and/or `tool_calls`. `match` (case-insensitive substring of the last user message)
    and `after` (role of the last message: user or tool) restrict which request consumes it;
    the first queued reply that fits is used. `repeat` keeps it in the queue as a standing
    rule (use with `match`). `delay` holds back the first chunk (time to first token);
    `error_status` answers with an OpenAI-style HTTP error instead.
    """

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    match: str | None = None
    after: LastRole = "any"
    delay: float = 0.0
    error_status: int | None = None
    repeat: bool = False
    scripted: bool = True

    @classmethod
    def from_json(cls, value: str | dict[str, Any]) -> LLMReply:
        if isinstance(value, str):
            return cls(text=value)
        if not isinstance(value, dict):
            raise ScriptError(f"llm reply must be a string or an object, got {value!r}")
        known = {"text", "tool_calls", "match", "after", "delay", "error_status", "repeat"}
        unknown = set(value) - known
        if unknown:
            raise ScriptError(f"llm reply has unknown field(s) {sorted(unknown)}")
        calls = []
        for index, call in enumerate(value.get("tool_calls") or []):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ScriptError(f"llm reply tool_calls[{index}] needs a string 'name'")
            arguments = call.get("arguments", {})
            if not isinstance(arguments, dict):
                raise ScriptError(f"llm reply tool_calls[{index}].arguments must be an object")
            calls.append(ToolCall(call["name"], arguments, call.get("id") or new_tool_call_id()))
        after = value.get("after", "any")
        if after not in ("any", "user", "tool"):
            raise ScriptError(f"llm reply 'after' must be any, user or tool, got {after!r}")
        return cls(
            text=str(value.get("text", "")),
            tool_calls=calls,
            match=value.get("match"),
            after=after,
            delay=float(value.get("delay", 0.0)),
            error_status=value.get("error_status"),
            repeat=bool(value.get("repeat", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def fits(self, messages: list[dict[str, Any]]) -> bool:
        last_role = messages[-1].get("role") if messages else None
        if self.after != "any" and last_role != self.after:
            return False
        if self.match is not None:
            return self.match.lower() in last_user_text(messages).lower()
        return True


@dataclass
class Transcript:
    """One scripted transcription; `delay` holds back the answer (STT latency)."""

    text: str
    delay: float = 0.0

    @classmethod
    def from_json(cls, value: str | dict[str, Any]) -> Transcript:
        if isinstance(value, str):
            return cls(text=value)
        if not isinstance(value, dict) or not isinstance(value.get("text"), str):
            raise ScriptError(f"transcript must be a string or {{'text': ...}}, got {value!r}")
        return cls(text=value["text"], delay=float(value.get("delay", 0.0)))


def message_text(message: dict[str, Any]) -> str:
    """Text of an OpenAI chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def default_reply(messages: list[dict[str, Any]]) -> LLMReply:
    """What the server says when nothing is scripted: a voice agent that echoes.

    After a tool result it reads the result back (so webhook tests hear it); after a user
    message it repeats it; otherwise (a greeting or an instruction) it greets.
    """
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        result = message_text(last).strip()
        if len(result) > MAX_TOOL_RESULT_CHARS:
            result = result[:MAX_TOOL_RESULT_CHARS] + "..."
        return LLMReply(text=f"Here is what I found: {result}", scripted=False)
    if last.get("role") == "user":
        said = message_text(last).strip()
        if said:
            return LLMReply(text=f"You said: {said}", scripted=False)
    return LLMReply(text=DEFAULT_GREETING_REPLY, scripted=False)


def api_key_fingerprint(authorization: str | None) -> str | None:
    """First 12 hex digits of the bearer key's SHA-256: enough to check which secret arrived,
    without the server ever storing or logging the key itself."""
    if not authorization:
        return None
    key = authorization.removeprefix("Bearer ").strip()
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else None


class ProviderState:
    """Scripted queues, defaults, and the log of every request served."""

    def __init__(self, *, default_transcript: str = DEFAULT_TRANSCRIPT) -> None:
        self.default_transcript = default_transcript
        self._llm_replies: list[LLMReply] = []
        # Replies already given, by conversation: the same conversation sent again (a retry,
        # or livekit-agents re-running a preemptive generation) gets the same answer instead
        # of consuming the next scripted one, as a deterministic model would.
        self._answered: dict[str, LLMReply] = {}
        self._transcripts: deque[Transcript] = deque()
        self._requests: list[dict[str, Any]] = []

    def script(
        self,
        *,
        llm: list[LLMReply | str | dict[str, Any]] | None = None,
        transcripts: list[Transcript | str | dict[str, Any]] | None = None,
        default_transcript: str | None = None,
    ) -> None:
        """Append replies and transcripts to the queues (validated before anything changes)."""
        replies = [r if isinstance(r, LLMReply) else LLMReply.from_json(r) for r in llm or []]
        texts = [
            t if isinstance(t, Transcript) else Transcript.from_json(t) for t in transcripts or []
        ]
        self._llm_replies.extend(replies)
        self._transcripts.extend(texts)
        if default_transcript is not None:
            self.default_transcript = default_transcript

    def reset(self) -> None:
        self._llm_replies.clear()
        self._answered.clear()
        self._transcripts.clear()
        self._requests.clear()
        self.default_transcript = DEFAULT_TRANSCRIPT

    def pending(self) -> dict[str, int]:
        return {"llm": len(self._llm_replies), "transcripts": len(self._transcripts)}

    def next_llm_reply(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> LLMReply:
        key = hashlib.sha256(json.dumps([messages, tools], sort_keys=True).encode()).hexdigest()
        if key in self._answered:
            return self._answered[key]
        reply = next((r for r in self._llm_replies if r.fits(messages)), None)
        if reply is None:
            reply = default_reply(messages)
        elif not reply.repeat:
            self._llm_replies.remove(reply)
        if reply.error_status is None:  # a retry after a scripted failure moves on
            self._answered[key] = reply
        return reply

    def next_transcript(self) -> tuple[Transcript, bool]:
        """The next scripted transcript (and True), or the default (and False)."""
        if self._transcripts:
            return self._transcripts.popleft(), True
        return Transcript(self.default_transcript), False

    def record(self, kind: RequestKind, entry: dict[str, Any]) -> dict[str, Any]:
        """Log a request; the returned dict may be filled in further (e.g. with the reply)."""
        entry = {"kind": kind, "at": time.time(), **entry}
        # Only JSON-able data goes in, so the control API can return it unchanged.
        json.dumps(entry)
        self._requests.append(entry)
        return entry

    def requests(self, kind: RequestKind | None = None) -> list[dict[str, Any]]:
        return [dict(r) for r in self._requests if kind is None or r["kind"] == kind]


# Where the servers find the shared state and the API key they require, on the aiohttp app.
STATE_KEY: web.AppKey[ProviderState] = web.AppKey("provider_state", ProviderState)
REQUIRED_API_KEY: web.AppKey[str | None] = web.AppKey("required_api_key", str)
