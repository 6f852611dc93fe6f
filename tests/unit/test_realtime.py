"""spec.pipeline.realtime: validation naming the field, provider keys, and the runtime's model
and message TTS built from it (the real call is in tests/integration/test_realtime.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator.api import SpecError, parse_spec
from voicefleet_runtime import pipeline
from voicefleet_runtime.config import PipelineConfig, RealtimeConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def spec_with_pipeline(pipeline_spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(yaml.safe_load((EXAMPLES / "voiceagent.yaml").read_text())["spec"])
    spec["pipeline"] = pipeline_spec
    return spec


@pytest.mark.parametrize(
    ("pipeline_spec", "expected"),
    [
        (
            {"realtime": {}, "llm": {"model": "gpt-4o"}},
            "spec.pipeline: realtime replaces stt, llm and tts, but pipeline.llm is set too",
        ),
        (
            {"realtime": {}, "stt": {"provider": "openai"}, "tts": {"provider": "openai"}},
            "pipeline.stt, pipeline.tts is set too; remove them or remove pipeline.realtime",
        ),
        ({"realtime": {"temperature": 0.7}}, "spec.pipeline.realtime.temperature: unknown field"),
        ({"realtime": {"provider": "gemini"}}, "spec.pipeline.realtime.provider"),
        ({"realtime": {"modalities": ["text"]}}, "modalities: only [audio] is offered"),
        (
            {"realtime": {"turnDetection": {"type": "semantic_vad", "silenceDurationMs": 300}}},
            "silenceDurationMs applies to type server_vad only",
        ),
        (
            {"realtime": {"turnDetection": {"eagerness": "high"}}},
            "eagerness applies to type semantic_vad only",
        ),
    ],
)
def test_bad_realtime_specs_are_refused_naming_the_field(
    pipeline_spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec_with_pipeline(pipeline_spec))
    assert expected in str(raised.value)


def test_the_realtime_example_is_valid_and_needs_only_the_openai_key() -> None:
    document = yaml.safe_load((EXAMPLES / "voiceagent-realtime.yaml").read_text())
    spec = parse_spec(document["spec"])
    assert spec.pipeline.realtime is not None
    assert spec.pipeline.realtime.turn_detection.type == "semantic_vad"


def test_the_runtime_builds_a_realtime_model_without_stt_or_tts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config = PipelineConfig.model_validate(
        {
            "realtime": {
                "model": "gpt-realtime",
                "voice": "marin",
                "baseUrl": "ws://127.0.0.1:8300/v1",
                "turnDetection": {"type": "server_vad", "silenceDurationMs": 700},
            }
        }
    )
    built = pipeline.build_pipeline(config, vad=object())
    options = built.session_options()
    assert "stt" not in options and "tts" not in options
    assert built.turn_handling["turn_detection"] == "realtime_llm"
    model = built.llm
    assert type(model).__name__ == "RealtimeModel" and model.model == "gpt-realtime"
    assert model._opts.voice == "marin"
    assert model._opts.turn_detection.silence_duration_ms == 700
    message = pipeline.message_tts(config)
    assert (message.provider, message.base_url) == ("openai", "http://127.0.0.1:8300/v1")
    assert pipeline.message_tts(PipelineConfig()) == PipelineConfig().tts


def test_realtime_defaults() -> None:
    realtime = RealtimeConfig()
    assert (realtime.provider, realtime.model, realtime.modalities) == (
        "openai",
        "gpt-realtime",
        ["audio"],
    )


def test_lines_said_as_written_go_to_the_model_without_a_tts() -> None:
    from voicefleet_runtime.agents import say_line

    calls: list[tuple[str, dict[str, Any]]] = []

    class Session:
        def __init__(self, tts: object | None) -> None:
            self.tts = tts

        def say(self, text: str, **options: Any) -> str:
            calls.append(("say", {"text": text, **options}))
            return "handle"

        def generate_reply(self, **options: Any) -> str:
            calls.append(("generate_reply", options))
            return "handle"

    assert say_line(Session(tts=object()), "Hello.", allow_interruptions=False) == "handle"
    assert say_line(Session(tts=None), "Hello.") == "handle"
    assert calls == [
        ("say", {"text": "Hello.", "allow_interruptions": False}),
        (
            "generate_reply",
            {
                "instructions": 'Say exactly the following words, and nothing else: "Hello."',
                "allow_interruptions": True,
            },
        ),
    ]
