"""Builds one call's record from its AgentSession's events (job process).

What comes from where (livekit-agents 1.8):
  transcript   `conversation_item_added` ChatMessages: user -> caller, assistant -> agent; times
               from ChatMessage.metrics (started/stopped_speaking_at), else the item's time;
               `interrupted` as livekit-agents marks it.
  agents       `conversation_item_added` AgentHandoff items (the entry agent's comes first).
  toolCalls    `function_tools_executed`: each FunctionCall with its FunctionCallOutput; the
               latency is output time - call time. Only the LLM's arguments are kept.
  usage        `session_usage_updated` (cumulative totals of livekit-agents' ModelUsageCollector),
               and AgentSession.usage once more when the call ends.
  latency      first `agent_state_changed` to speaking (greeting), assistant items'
               metrics.e2e_latency (turn latency).
  endReason    the session's CloseEvent, the job's shutdown reason and what the call's controls
               did (end_call, transfer); see `end_reason`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from livekit.agents import (
    AgentSession,
    AgentStateChangedEvent,
    CloseEvent,
    ConversationItemAddedEvent,
    FunctionToolsExecutedEvent,
    SessionUsageUpdatedEvent,
)
from livekit.agents.llm import AgentHandoff, ChatMessage
from livekit.agents.metrics import LLMModelUsage, STTModelUsage, TTSModelUsage

from voicefleet_runtime.callrecords import (
    AgentSpan,
    CallRecord,
    EndReason,
    Latency,
    LlmUsage,
    Recording,
    SttUsage,
    ToolCall,
    TtsUsage,
    Turn,
    Usage,
    nearest_rank,
    utc,
)

logger = logging.getLogger("voicefleet.runtime.recorder")


def end_reason(
    close_reason: str | None,
    shutdown_reason: str,
    *,
    hung_up_by_agent: bool = False,
    transferred: bool = False,
    failed: bool = False,
    overflowed: bool = False,
    limit_reached: EndReason | None = None,
) -> EndReason:
    """How the call ended, from what the agent did and what livekit-agents reported.

    An overflow call (the caller got spec.overflow, not an agent) is `overflow`, whatever
    ended it. The agent's own actions win (its end_call deletes the room, which also disconnects the
    caller); then failures; then the session's close reason; then the job's shutdown reason
    ("parent process shutdown" is the worker exiting with the call still running).
    """
    if overflowed:
        return "overflow"
    if transferred:
        return "transferred"
    if limit_reached is not None:  # a call limit made the agent hang up (limits.py)
        return limit_reached
    if hung_up_by_agent:
        return "agent_ended"
    if failed or close_reason == "error" or "crash" in shutdown_reason:
        return "error"
    if close_reason == "participant_disconnected":
        return "caller_hung_up"
    if "parent process shutdown" in shutdown_reason:
        return "drained"
    if close_reason in ("user_initiated", "task_completed"):
        return "agent_ended"
    return "room_closed"


def _text(item: ChatMessage) -> str:
    return (item.text_content or "").strip()


def _arguments(raw: str) -> dict[str, Any] | str:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return raw
    return value if isinstance(value, dict) else raw


class CallRecorder:
    """Observes one call; `finish` returns its CallRecord."""

    def __init__(
        self,
        *,
        tenant: str,
        voice_agent: str,
        dispatch_name: str,
        config_hash: str,
        job_id: str,
        room: str,
        providers: dict[str, str] | None = None,
        dispatch_received_at: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.record_id = str(uuid.uuid4())
        self.tenant = tenant
        self.voice_agent = voice_agent
        self.dispatch_name = dispatch_name
        self.config_hash = config_hash
        self.job_id = job_id
        self.room = room
        self.providers = providers or {}
        """Configured provider per usage type (llm_usage, tts_usage, stt_usage); the plugins
        report the endpoint's host as provider when the base URL is overridden."""
        self._clock = clock
        self.started_at = dispatch_received_at or clock()
        self.answered_at: float | None = None
        self.caller_number = ""
        self.dialed_number = ""
        self.sip_call_id = ""
        self.phone = False
        self.spans: list[AgentSpan] = []
        self.turns: list[Turn] = []
        self.tool_calls: list[ToolCall] = []
        self.turn_latencies: list[float] = []
        self.usage: list[Any] = []
        self.close_reason: str | None = None
        self.ended_at: float | None = None
        self.recording_started_at: float | None = None
        self.recording: Recording | None = None
        """Set once the call's recording is uploaded."""
        self.close_detail = ""
        self.failed = False
        self._session: AgentSession[Any] | None = None
        self._current_agent: Callable[[], str] = lambda: ""

    # --- wiring -------------------------------------------------------------------------------

    def set_caller(
        self,
        *,
        phone: bool,
        caller_number: str = "",
        dialed_number: str = "",
        sip_call_id: str = "",
    ) -> None:
        self.phone = phone
        self.caller_number = caller_number
        self.dialed_number = dialed_number
        self.sip_call_id = sip_call_id

    def attach(self, session: AgentSession[Any], current_agent: Callable[[], str]) -> None:
        self._session = session
        self._current_agent = current_agent
        session.on("conversation_item_added", self._on_item)
        session.on("function_tools_executed", self._on_tools)
        session.on("session_usage_updated", self._on_usage)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("close", self._on_close)

    # --- events -------------------------------------------------------------------------------

    def _agent(self) -> str | None:
        return self._current_agent() or (self.spans[-1].name if self.spans else None)

    def _on_agent_state(self, event: AgentStateChangedEvent) -> None:
        if event.new_state == "speaking" and self.answered_at is None:
            self.answered_at = event.created_at

    def _on_item(self, event: ConversationItemAddedEvent) -> None:
        item = event.item
        if isinstance(item, AgentHandoff):
            at = utc(item.created_at)
            if self.spans and self.spans[-1].ended_at is None:
                self.spans[-1].ended_at = at
            self.spans.append(AgentSpan(name=item.new_agent_id, started_at=at))
            return
        if not isinstance(item, ChatMessage) or item.role not in ("user", "assistant"):
            return
        text = _text(item)
        if not text:
            return
        report: dict[str, Any] = dict(item.metrics)
        started = report.get("started_speaking_at") or item.created_at
        stopped = report.get("stopped_speaking_at")
        self.turns.append(
            Turn(
                speaker="caller" if item.role == "user" else "agent",
                agent=self._agent(),
                text=text,
                started_at=utc(float(started)),
                ended_at=utc(float(stopped)) if stopped else None,
                interrupted=bool(item.interrupted),
            )
        )
        latency = report.get("e2e_latency")
        if item.role == "assistant" and isinstance(latency, int | float) and latency >= 0:
            self.turn_latencies.append(float(latency))

    def _on_tools(self, event: FunctionToolsExecutedEvent) -> None:
        for call, output in event.zipped():
            error = output.output if output.is_error else None
            self.tool_calls.append(
                ToolCall(
                    name=call.name,
                    agent=self._agent(),
                    arguments=_arguments(call.arguments),
                    status="error" if output.is_error else "ok",
                    error=error[:500] if error else None,
                    started_at=utc(call.created_at),
                    latency_seconds=round(max(0.0, output.created_at - call.created_at), 3),
                )
            )

    def _on_usage(self, event: SessionUsageUpdatedEvent) -> None:
        self.usage = list(event.usage.model_usage)

    def _on_close(self, event: CloseEvent) -> None:
        reason = event.reason.value if hasattr(event.reason, "value") else str(event.reason)
        self.close_reason = reason
        if event.error is not None:
            self.close_detail = f"{type(event.error).__name__}"

    def job_failed(self) -> None:
        self.failed = True

    def mark_ended(self) -> None:
        """The call is over (the record's endedAt), whatever is done with it afterwards."""
        if self.ended_at is None:
            self.ended_at = self._clock()

    # --- the record ---------------------------------------------------------------------------

    def _usage(self) -> Usage:
        usage = self.usage
        if self._session is not None:
            try:
                usage = list(self._session.usage.model_usage) or usage
            except Exception:  # a session that never started has no collector
                logger.debug("no session usage", exc_info=True)
        result = Usage()
        for entry in usage:
            provider = self.providers.get(entry.type) or entry.provider or "unknown"
            model = entry.model or ""
            if isinstance(entry, LLMModelUsage):
                result.llm.append(
                    LlmUsage(
                        provider=provider,
                        model=model,
                        prompt_tokens=entry.input_tokens,
                        cached_prompt_tokens=entry.input_cached_tokens,
                        completion_tokens=entry.output_tokens,
                    )
                )
            elif isinstance(entry, TTSModelUsage):
                result.tts.append(
                    TtsUsage(
                        provider=provider,
                        model=model,
                        characters=entry.characters_count,
                        audio_seconds=round(entry.audio_duration, 3),
                    )
                )
            elif isinstance(entry, STTModelUsage):
                result.stt.append(
                    SttUsage(
                        provider=provider, model=model, audio_seconds=round(entry.audio_duration, 3)
                    )
                )
        return result

    def finish(
        self,
        shutdown_reason: str,
        *,
        hung_up_by_agent: bool = False,
        transferred: bool = False,
        overflowed: bool = False,
        limit_reached: EndReason | None = None,
    ) -> CallRecord:
        self.mark_ended()
        assert self.ended_at is not None
        ended = self.ended_at
        ended_at = utc(ended)
        if self.spans and self.spans[-1].ended_at is None:
            self.spans[-1].ended_at = ended_at
        reason = end_reason(
            self.close_reason,
            shutdown_reason,
            hung_up_by_agent=hung_up_by_agent,
            transferred=transferred,
            failed=self.failed,
            overflowed=overflowed,
            limit_reached=limit_reached,
        )
        detail = "; ".join(
            part
            for part in (
                f"session closed: {self.close_reason}" if self.close_reason else "",
                self.close_detail,
                f"job shutdown: {shutdown_reason}" if shutdown_reason else "",
            )
            if part
        )
        greeting = (
            round(max(0.0, self.answered_at - self.started_at), 3)
            if self.answered_at is not None
            else None
        )
        p50 = nearest_rank(self.turn_latencies, 0.5)
        p95 = nearest_rank(self.turn_latencies, 0.95)
        return CallRecord(
            record_id=self.record_id,
            tenant=self.tenant,
            voice_agent=self.voice_agent,
            dispatch_name=self.dispatch_name,
            config_hash=self.config_hash,
            job_id=self.job_id,
            room=self.room,
            channel="phone" if self.phone else "webrtc",
            caller_number=self.caller_number or None,
            dialed_number=self.dialed_number or None,
            sip_call_id=self.sip_call_id or None,
            started_at=utc(self.started_at),
            answered_at=utc(self.answered_at) if self.answered_at is not None else None,
            ended_at=ended_at,
            duration_seconds=round(max(0.0, ended - self.started_at), 3),
            end_reason=reason,
            end_detail=detail,
            agents=self.spans,
            transcript=self.turns,
            tool_calls=self.tool_calls,
            usage=self._usage(),
            latency=Latency(
                dispatch_to_greeting_seconds=greeting,
                turn_p50_seconds=round(p50, 3) if p50 is not None else None,
                turn_p95_seconds=round(p95, 3) if p95 is not None else None,
                turns=len(self.turn_latencies),
            ),
            recording=self.recording,
        )
