"""The overflow desk synthesises its message in the worker's main process, outside any job:
with each TTS provider, through the real plugin against the local provider server."""

from __future__ import annotations

import pytest
from voicefleet_runtime.config import RuntimeConfig
from voicefleet_runtime.overflow import OverflowDesk
from voicefleet_testkit.providers import ProviderServer


@pytest.mark.parametrize("provider", ["elevenlabs", "openai"])
async def test_the_message_is_synthesised_outside_a_job(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ElevenLabs' plugin takes livekit-agents' job HTTP session unless given one: in the main
    # process there is none ("Attempted to use an http session outside of a job context").
    monkeypatch.setenv("ELEVEN_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    async with ProviderServer() as server:
        config = RuntimeConfig.model_validate(
            {
                "tenant": "acme",
                "name": "support",
                "dispatchName": "acme.support",
                "agents": [{"name": "main", "instructions": "Help."}],
                "entry": "main",
                "pipeline": {"tts": {"provider": provider, "baseUrl": f"{server.url}/v1"}},
                "overflow": {"message": "All our agents are busy, please call again later."},
            }
        )
        desk = OverflowDesk(config, url="ws://127.0.0.1:7880", api_key="k", api_secret="s")
        frames, (sample_rate, channels) = await desk.message()
    assert sum(frame.duration for frame in frames) > 0.5
    assert sample_rate > 0 and channels == 1
