"""Per-call metrics: session events of one AgentSession into the `voicefleet_*` series.

Runs in the job process. Latencies come from the ChatMessage.metrics livekit-agents attaches to
each conversation item (user items: STT delay, end-of-turn delay; assistant items: LLM TTFT,
TTS TTFB and `e2e_latency`, end of user speech to the first audio of the reply, which is the
turn latency). Usage comes from `session_usage_updated`, whose totals are cumulative per
provider/model: the difference to the last event is added to the counters, attributed to the
agent that was active, so counters stay monotonic and sum to the session's usage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from livekit.agents import (
    AgentSession,
    AgentStateChangedEvent,
    CloseEvent,
    ConversationItemAddedEvent,
    ErrorEvent,
    SessionUsageUpdatedEvent,
)
from livekit.agents import llm as lk_llm
from livekit.agents import stt as lk_stt
from livekit.agents import tts as lk_tts
from livekit.agents.llm import ChatMessage
from livekit.agents.metrics import LLMModelUsage, STTModelUsage, TTSModelUsage
from prometheus_client import Histogram

from voicefleet_runtime import metrics

logger = logging.getLogger("voicefleet.runtime.telemetry")

USER_LATENCIES: dict[str, Histogram] = {
    "transcription_delay": metrics.STT_DELAY,
    "end_of_turn_delay": metrics.END_OF_TURN_DELAY,
}
ASSISTANT_LATENCIES: dict[str, Histogram] = {
    "llm_node_ttft": metrics.LLM_TTFT,
    "tts_node_ttfb": metrics.TTS_TTFB,
    "e2e_latency": metrics.TURN_LATENCY,
}


def _component(source: Any) -> str:
    if isinstance(source, lk_llm.LLM):
        return "llm"
    if isinstance(source, lk_stt.STT):
        return "stt"
    if isinstance(source, lk_tts.TTS):
        return "tts"
    return "session"


class CallTelemetry:
    """Observes one call's session; `labels` are tenant and agent (the VoiceAgent)."""

    def __init__(
        self,
        labels: dict[str, str],
        providers: dict[str, str] | None = None,
        dispatch_received_at: float = 0.0,
    ) -> None:
        self.labels = labels
        self.providers = providers or {}
        """Configured provider per usage type (llm_usage, tts_usage, stt_usage): the plugins
        report the endpoint's host as provider when the base URL is overridden."""
        self.started_at = time.time()
        self.dispatch_received_at = dispatch_received_at or self.started_at
        self.greeting_latency: float | None = None
        self._current_agent: Callable[[], str] = lambda: ""
        self._last_usage: dict[tuple[str, str, str, str], float] = {}
        self._ended = False
        metrics.CALLS_STARTED.labels(**labels).inc()
        metrics.ACTIVE_JOBS.labels(**labels).inc()

    def attach(self, session: AgentSession[Any], current_agent: Callable[[], str]) -> None:
        self._current_agent = current_agent
        session.on("conversation_item_added", self._on_item)
        session.on("session_usage_updated", self._on_usage)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("error", self._on_error)
        session.on("close", self._on_close)

    def _turn_labels(self) -> dict[str, str]:
        return {**self.labels, "llm_agent": self._current_agent() or "unknown"}

    # --- events -----------------------------------------------------------------------------

    def _on_agent_state(self, event: AgentStateChangedEvent) -> None:
        if event.new_state == "speaking" and self.greeting_latency is None:
            self.greeting_latency = max(0.0, event.created_at - self.dispatch_received_at)
            metrics.DISPATCH_TO_GREETING.labels(**self.labels).observe(self.greeting_latency)
            logger.info("first audio %.3fs after the job request", self.greeting_latency)

    def _on_item(self, event: ConversationItemAddedEvent) -> None:
        item = event.item
        if not isinstance(item, ChatMessage):
            return
        report: dict[str, Any] = dict(item.metrics)
        table = USER_LATENCIES if item.role == "user" else ASSISTANT_LATENCIES
        for key, histogram in table.items():
            value = report.get(key)
            if isinstance(value, int | float) and value >= 0:
                histogram.labels(**self._turn_labels()).observe(value)

    def _on_usage(self, event: SessionUsageUpdatedEvent) -> None:
        for usage in event.usage.model_usage:
            if isinstance(usage, LLMModelUsage):
                self._add(usage, "prompt_tokens", usage.input_tokens, metrics.LLM_PROMPT_TOKENS)
                self._add(
                    usage, "completion_tokens", usage.output_tokens, metrics.LLM_COMPLETION_TOKENS
                )
            elif isinstance(usage, TTSModelUsage):
                self._add(usage, "characters", usage.characters_count, metrics.TTS_CHARACTERS)
                self._add(usage, "tts_audio", usage.audio_duration, metrics.TTS_AUDIO_SECONDS)
            elif isinstance(usage, STTModelUsage):
                self._add(usage, "stt_audio", usage.audio_duration, metrics.STT_AUDIO_SECONDS)

    def _add(self, usage: Any, kind: str, total: float, counter: Any) -> None:
        key = (kind, usage.type, usage.provider, usage.model)
        delta = total - self._last_usage.get(key, 0.0)
        if delta <= 0:
            return
        self._last_usage[key] = total
        provider = self.providers.get(usage.type) or usage.provider or "unknown"
        counter.labels(**self._turn_labels(), provider=provider, model=usage.model or "").inc(delta)

    def _on_error(self, event: ErrorEvent) -> None:
        recoverable = getattr(event.error, "recoverable", False)
        metrics.ERRORS.labels(
            **self.labels,
            component=_component(event.source),
            recoverable="true" if recoverable else "false",
        ).inc()

    def _on_close(self, event: CloseEvent) -> None:
        reason = event.reason.value if hasattr(event.reason, "value") else str(event.reason)
        self.end(reason)

    def job_failed(self) -> None:
        metrics.ERRORS.labels(**self.labels, component="job", recoverable="false").inc()

    def end(self, reason: str) -> None:
        """Close the call's books once (session close or job shutdown, whichever is first)."""
        if self._ended:
            return
        self._ended = True
        duration = max(0.0, time.time() - self.started_at)
        metrics.CALL_SECONDS.labels(**self.labels).inc(duration)
        metrics.CALL_DURATION.labels(**self.labels).observe(duration)
        metrics.CALLS_ENDED.labels(**self.labels, reason=reason).inc()
        metrics.ACTIVE_JOBS.labels(**self.labels).dec()
