"""Local stand-ins for the paid providers (OpenAI, Deepgram, ElevenLabs): real HTTP and
WebSocket servers speaking their protocols, so the real livekit plugins run over the network.

See server.py for the in-process API and the control API, openai_server.py for the endpoints.
"""

from voicefleet_testkit.providers.control import ProviderControl, ProviderControlError
from voicefleet_testkit.providers.script import (
    DEFAULT_GREETING_REPLY,
    DEFAULT_TRANSCRIPT,
    LLMReply,
    ProviderState,
    ScriptError,
    ToolCall,
    Transcript,
)
from voicefleet_testkit.providers.server import ProviderServer, openai_pipeline, pointed_at

__all__ = [
    "DEFAULT_GREETING_REPLY",
    "DEFAULT_TRANSCRIPT",
    "LLMReply",
    "ProviderControl",
    "ProviderControlError",
    "ProviderServer",
    "ProviderState",
    "ScriptError",
    "ToolCall",
    "Transcript",
    "openai_pipeline",
    "pointed_at",
]
