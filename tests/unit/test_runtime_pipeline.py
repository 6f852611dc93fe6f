"""The pipeline from config: which plugin, which endpoint, which turn detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from livekit.agents.inference_runner import _InferenceRunner
from livekit.plugins import deepgram, elevenlabs, openai, silero
from livekit.plugins.turn_detector.models import HG_MODEL, MODEL_REVISIONS
from voicefleet_runtime import pipeline
from voicefleet_runtime.config import PipelineConfig


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "ELEVEN_API_KEY"):
        monkeypatch.setenv(name, "test-key")


def test_default_providers_are_deepgram_openai_elevenlabs() -> None:
    config = PipelineConfig()
    assert isinstance(pipeline.build_stt(config.stt), deepgram.STT)
    assert isinstance(pipeline.build_llm(config.llm), openai.LLM)
    assert isinstance(pipeline.build_tts(config.tts), elevenlabs.TTS)


def test_every_base_url_is_overridden() -> None:
    config = PipelineConfig.model_validate(
        {
            "stt": {"provider": "deepgram", "model": "nova-3", "baseUrl": "http://stt.local:1"},
            "llm": {"model": "llama", "baseUrl": "http://llm.local:2/v1", "temperature": 0.2},
            "tts": {"provider": "elevenlabs", "voice": "v1", "baseUrl": "http://tts.local:3/v1"},
        }
    )
    stt = pipeline.build_stt(config.stt)
    assert stt._opts.endpoint_url == "http://stt.local:1/v1/listen"
    llm = pipeline.build_llm(config.llm)
    assert (llm.model, str(llm._client.base_url)) == ("llama", "http://llm.local:2/v1/")
    tts = pipeline.build_tts(config.tts)
    assert (tts._opts.base_url, tts._opts.voice_id) == ("http://tts.local:3/v1", "v1")


def test_openai_speech_providers() -> None:
    config = PipelineConfig.model_validate(
        {
            "stt": {"provider": "openai", "model": "whisper-1", "baseUrl": "http://a:1/v1"},
            "tts": {
                "provider": "openai",
                "voice": "alloy",
                "model": "tts-1",
                "baseUrl": "http://a:1/v1",
            },
        }
    )
    stt = pipeline.build_stt(config.stt)
    assert isinstance(stt, openai.STT) and str(stt._client.base_url) == "http://a:1/v1/"
    tts = pipeline.build_tts(config.tts)
    assert isinstance(tts, openai.TTS) and (tts.model, tts._opts.voice) == ("tts-1", "alloy")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.deepgram.com", "https://api.deepgram.com/v1/listen"),
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000/v1/listen"),
        ("wss://dg.example/v1/listen", "wss://dg.example/v1/listen"),
    ],
)
def test_deepgram_listen_url(given: str, expected: str) -> None:
    assert pipeline.deepgram_listen_url(given) == expected


def test_silero_vad_loads_its_packaged_model_with_the_configured_options() -> None:
    config = PipelineConfig.model_validate(
        {"vad": {"activationThreshold": 0.6, "minSilenceSeconds": 0.3}}
    )
    vad = pipeline.load_vad(config.vad)
    assert isinstance(vad, silero.VAD)
    assert (vad._opts.activation_threshold, vad._opts.min_silence_duration) == (0.6, 0.3)


def test_turn_handling_maps_the_config() -> None:
    config = PipelineConfig.model_validate(
        {
            "interruptions": {"enabled": False, "minDurationSeconds": 0.8, "minWords": 2},
            "endpointing": {"minDelaySeconds": 0.3, "maxDelaySeconds": 4},
            "preemptiveGeneration": True,
        }
    )
    handling = pipeline.turn_handling(config, "vad")
    assert handling == {
        "turn_detection": "vad",
        "endpointing": {"min_delay": 0.3, "max_delay": 4.0},
        "interruption": {"enabled": False, "mode": "vad", "min_duration": 0.8, "min_words": 2},
        "preemptive_generation": {"enabled": True},
    }


def test_plugin_modules_follow_the_providers() -> None:
    config = PipelineConfig.model_validate(
        {"stt": {"provider": "deepgram"}, "noiseCancellation": {"mode": "bvc"}}
    )
    # Not the noise cancellation plugin: its import uses livekit.rtc, which must not happen
    # before the forkserver forks (tests/integration/test_noise_cancellation.py).
    assert pipeline.plugin_modules(config) == [
        "livekit.plugins.deepgram",
        "livekit.plugins.elevenlabs",
        "livekit.plugins.openai",
        "livekit.plugins.silero",
        *pipeline.LAZY_SDK_MODULES,
    ]


def test_lazy_sdk_modules_exist() -> None:
    """Every module the forkserver preloads for the SDKs is there (the forkserver skips a
    missing one silently, and the job would import it in the call again)."""
    import importlib.util

    for name in pipeline.LAZY_SDK_MODULES:
        assert importlib.util.find_spec(name) is not None, name


# --- turn detection ------------------------------------------------------------------------


def fill_hf_cache(cache: Path, model_type: str) -> None:
    """Lay out the turn-detector files as huggingface_hub's cache stores a download."""
    revision = MODEL_REVISIONS[model_type]  # type: ignore[index]
    repo = cache / ("models--" + HG_MODEL.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    for name in pipeline.TURN_DETECTOR_FILES:
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"model bytes")


@pytest.mark.parametrize("mode", ["english", "multilingual"])
def test_missing_model_files_fall_back_to_vad(mode: str, tmp_path: Path) -> None:
    config = PipelineConfig.model_validate({"turnDetection": {"mode": mode}})
    plan = pipeline.plan_turn_detection(config, cache_dir=str(tmp_path))
    assert (plan.requested, plan.effective, plan.fell_back) == (mode, "vad", True)
    assert "onnx/model_q8.onnx" in plan.reason and "download-files" in plan.reason


def test_present_model_files_keep_the_model(tmp_path: Path) -> None:
    fill_hf_cache(tmp_path, "en")
    config = PipelineConfig.model_validate({"turnDetection": {"mode": "english"}})
    plan = pipeline.plan_turn_detection(config, cache_dir=str(tmp_path))
    assert (plan.effective, plan.fell_back) == ("english", False)
    # The multilingual revision is a different one: still missing.
    multilingual = PipelineConfig.model_validate({"turnDetection": {"mode": "multilingual"}})
    assert pipeline.plan_turn_detection(multilingual, cache_dir=str(tmp_path)).fell_back


@pytest.mark.parametrize("mode", ["vad", "stt", "manual"])
def test_modes_without_a_model_need_no_files(mode: str, tmp_path: Path) -> None:
    config = PipelineConfig.model_validate({"turnDetection": {"mode": mode}})
    plan = pipeline.plan_turn_detection(config, cache_dir=str(tmp_path))
    assert (plan.effective, plan.fell_back) == (mode, False)


def test_registering_keeps_only_the_runner_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline._import_turn_detector()
    saved = dict(_InferenceRunner.registered_runners)
    monkeypatch.delenv(pipeline.EFFECTIVE_TURN_DETECTION_ENV, raising=False)
    try:
        pipeline.register_turn_detector(pipeline.TurnDetectionPlan("english", "english"))
        assert list(_InferenceRunner.registered_runners) == ["lk_end_of_utterance_en"]
        assert os.environ[pipeline.EFFECTIVE_TURN_DETECTION_ENV] == "english"

        pipeline.register_turn_detector(pipeline.TurnDetectionPlan("english", "vad", "no files"))
        assert _InferenceRunner.registered_runners == {}
        config = PipelineConfig.model_validate({"turnDetection": {"mode": "english"}})
        # Job processes follow the main process's decision.
        assert pipeline.effective_turn_mode(config) == "vad"
    finally:
        _InferenceRunner.registered_runners.clear()
        _InferenceRunner.registered_runners.update(saved)
        os.environ.pop(pipeline.EFFECTIVE_TURN_DETECTION_ENV, None)


def test_prebuilt_models_are_the_calls_models() -> None:
    """prewarm builds the call's STT/LLM/TTS (their clients' SSL contexts out of the call);
    the call uses exactly those, and builds only what was not prebuilt."""
    config = PipelineConfig.model_validate({"turnDetection": {"mode": "vad"}})
    models = pipeline.prebuild_models(config)
    assert isinstance(models["stt"], deepgram.STT)
    assert isinstance(models["llm"], openai.LLM)
    assert isinstance(models["tts"], elevenlabs.TTS)
    built = pipeline.build_pipeline(config, vad=object(), models=models)
    assert (built.stt, built.llm, built.tts) == (models["stt"], models["llm"], models["tts"])
    partly = pipeline.build_pipeline(config, vad=object(), models={"llm": models["llm"]})
    assert partly.llm is models["llm"]
    assert isinstance(partly.stt, deepgram.STT) and partly.stt is not models["stt"]
    realtime = PipelineConfig.model_validate({"realtime": {"model": "gpt-realtime"}})
    assert pipeline.prebuild_models(realtime) == {}
