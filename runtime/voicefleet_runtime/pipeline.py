"""The speech pipeline from config: STT, LLM, TTS, VAD, turn detection, noise cancellation.

Each provider is a livekit-agents plugin talking to the provider over the network; every base
URL can be overridden (self-hosted providers, the local provider servers of the tests).

Turn detection with the LiveKit turn-detector model (english / multilingual) needs model files
that the plugin does not download at run time (`python -m voicefleet_runtime download-files`
or the image's build argument fetches them). The main process decides once, at start-up, whether
the files are there (`plan_turn_detection`); without them it falls back to VAD turn detection,
logs a warning, sets `voicefleet_turn_detector_fallback` and passes the decision to the job
processes through the environment, so a worker never half-uses a model it cannot load.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from voicefleet_runtime import agents_internals
from voicefleet_runtime.config import (
    LlmConfig,
    NoiseCancellationConfig,
    PipelineConfig,
    RealtimeConfig,
    SttConfig,
    TtsConfig,
    VadConfig,
)

logger = logging.getLogger("voicefleet.runtime")

EFFECTIVE_TURN_DETECTION_ENV = "VOICEFLEET_EFFECTIVE_TURN_DETECTION"
"""Set by the main process: the turn detection mode job processes must use."""

TurnMode = Literal["multilingual", "english", "vad", "stt", "manual"]
MODEL_TYPES: dict[str, Literal["en", "multilingual"]] = {
    "english": "en",
    "multilingual": "multilingual",
}
# Files the turn-detector plugin loads with local_files_only=True.
TURN_DETECTOR_FILES = (
    "onnx/model_q8.onnx",
    "languages.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
DEEPGRAM_LISTEN_PATH = "/v1/listen"


# --- providers ------------------------------------------------------------------------------


def deepgram_listen_url(base_url: str) -> str:
    """Deepgram's plugin wants the full listen endpoint; accept a bare host as well."""
    stripped = base_url.rstrip("/")
    if stripped.endswith("/listen"):
        return stripped
    return stripped + DEEPGRAM_LISTEN_PATH


def build_stt(config: SttConfig) -> Any:
    if config.provider == "deepgram":
        from livekit.plugins import deepgram

        deepgram_options: dict[str, Any] = {"model": config.model, "language": config.language}
        if config.base_url:
            deepgram_options["base_url"] = deepgram_listen_url(config.base_url)
        return deepgram.STT(**deepgram_options)
    from livekit.plugins import openai

    openai_options: dict[str, Any] = {"model": config.model, "language": config.language}
    if config.base_url:
        openai_options["base_url"] = config.base_url
    return openai.STT(**openai_options)


def build_llm(config: LlmConfig) -> Any:
    from livekit.plugins import openai

    options: dict[str, Any] = {"model": config.model}
    if config.base_url:
        options["base_url"] = config.base_url
    if config.temperature is not None:
        options["temperature"] = config.temperature
    return openai.LLM(**options)


def build_tts(config: TtsConfig, *, http_session: Any | None = None) -> Any:
    """`http_session`: for use outside a job (the overflow desk in the main process), where
    livekit-agents has no HTTP session for the plugins that take one (ElevenLabs)."""
    options: dict[str, Any] = {}
    if config.base_url:
        options["base_url"] = config.base_url
    if config.model:
        options["model"] = config.model
    if config.provider == "elevenlabs":
        from livekit.plugins import elevenlabs

        if config.voice:
            options["voice_id"] = config.voice
        return elevenlabs.TTS(**options, http_session=http_session)
    from livekit.plugins import openai

    if config.voice:
        options["voice"] = config.voice
    return openai.TTS(**options)


def load_vad(config: VadConfig) -> Any:
    """Silero VAD; the ONNX model ships inside the plugin package (blocking, ~0.1 s)."""
    from livekit.plugins import silero

    return silero.VAD.load(
        activation_threshold=config.activation_threshold,
        min_silence_duration=config.min_silence_seconds,
    )


def noise_cancellation(config: NoiseCancellationConfig) -> Any:
    if config.mode == "none":
        return None
    from livekit.plugins import noise_cancellation as nc

    return nc.BVC() if config.mode == "bvc" else nc.BVCTelephony()


NOISE_CANCELLATION_MODULE = "livekit.plugins.noise_cancellation"
"""Never preloaded: importing it registers its audio filter with livekit.rtc's native runtime
(`rtc.AudioFilter`, an FFI request), which cannot be used across fork(); imported in the
forkserver, every job process's `ctx.connect()` fails ("livekit.rtc was used in a parent process
before fork()") and every call crashes. Each job process imports it when it builds its pipeline."""


LAZY_SDK_MODULES = (
    "openai.resources.chat.chat",
    "openai.resources.chat.completions.completions",
    "openai.resources.chat.completions.messages",
    "openai.resources.audio.audio",
    "openai.resources.audio.speech",
    "openai.resources.audio.transcriptions",
    "openai.resources.audio.translations",
    "openai.resources.audio.voice_consents",
    "openai.resources.audio.voices",
    "openai.resources.models",
    "openai.pagination",
    "openai.lib.streaming.chat",
    "openai.lib._chat_completion_resources",
    "openai.lib._parsing._audio",
    "openai.types.chat.completions",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "jiter",
)
"""What the provider SDKs import on their first request rather than at import (the openai SDK
loads its resources lazily: livekit-agents' own forkserver preload of `openai.resources` no
longer reaches them). Left to the job, every call paid ~1.2 s of imports idle, 0.3-1.5 s of
them as event-loop stalls between the join and the greeting or the first reply on a busy node,
and ~7 MB private to its process; imported in the forkserver, once per worker and shared
(measured in issue 17 by listing what a call imports after these preloads: nothing). Pure
Python and jiter's extension: nothing that starts a thread or touches livekit.rtc."""


def plugin_modules(config: PipelineConfig) -> list[str]:
    """The plugin packages this pipeline uses, for the forkserver to import once: a job process
    would otherwise spend seconds importing them at its first call (all but the noise
    cancellation plugin, see NOISE_CANCELLATION_MODULE), then the SDK modules they import
    lazily (LAZY_SDK_MODULES; a name the installed SDK lacks is skipped by the forkserver)."""
    modules = {f"livekit.plugins.{p}" for p in (config.stt.provider, config.tts.provider)}
    modules |= {"livekit.plugins.openai", "livekit.plugins.silero"}
    return [*sorted(modules), *LAZY_SDK_MODULES]


# --- turn detection -------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetectionPlan:
    requested: TurnMode
    effective: TurnMode
    reason: str = ""
    """Why effective differs from requested (empty when they agree)."""

    @property
    def fell_back(self) -> bool:
        return self.requested != self.effective


def missing_turn_detector_files(
    model_type: Literal["en", "multilingual"], cache_dir: str | None = None
) -> list[str]:
    """Files of the turn-detector model revision that are not in the Hugging Face cache
    (`cache_dir`, default: the cache the plugin reads, HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import try_to_load_from_cache
    from livekit.plugins.turn_detector.models import HG_MODEL, MODEL_REVISIONS

    revision = MODEL_REVISIONS[model_type]
    missing = []
    for filename in TURN_DETECTOR_FILES:
        found = try_to_load_from_cache(HG_MODEL, filename, cache_dir=cache_dir, revision=revision)
        if not isinstance(found, str) or not os.path.isfile(found):
            missing.append(filename)
    return missing


def _import_turn_detector() -> None:
    with warnings.catch_warnings():
        # The plugin is deprecated in favour of livekit.agents.inference.TurnDetector, an
        # audio model served by LiveKit Cloud; the text model runs locally, which we need.
        warnings.simplefilter("ignore", DeprecationWarning)
        import livekit.plugins.turn_detector  # noqa: F401


def plan_turn_detection(config: PipelineConfig, cache_dir: str | None = None) -> TurnDetectionPlan:
    """Decide the turn detection mode this worker can actually run (main process, at start)."""
    requested: TurnMode = config.turn_detection.mode
    if requested not in MODEL_TYPES:
        return TurnDetectionPlan(requested, requested)
    _import_turn_detector()
    missing = missing_turn_detector_files(MODEL_TYPES[requested], cache_dir)
    if missing:
        reason = (
            f"turn-detector model files for {requested!r} are not in the Hugging Face cache "
            f"({', '.join(missing)}); run `python -m voicefleet_runtime download-files` or build "
            "the image with --build-arg DOWNLOAD_MODELS=1"
        )
        return TurnDetectionPlan(requested, "vad", reason)
    return TurnDetectionPlan(requested, requested)


def register_turn_detector(plan: TurnDetectionPlan) -> None:
    """Keep only the inference runner this worker uses (main process, before the server runs).

    Importing the plugin registers the runners of both models; the worker's inference process
    would then load (and need the files of) both. An unused model costs ~200-400 MB, and a
    missing one would stop the worker from starting.
    """
    _import_turn_detector()
    from livekit.plugins.turn_detector.english import _EUORunnerEn
    from livekit.plugins.turn_detector.multilingual import _EUORunnerMultilingual

    keep = {
        "english": _EUORunnerEn.INFERENCE_METHOD,
        "multilingual": _EUORunnerMultilingual.INFERENCE_METHOD,
    }.get(plan.effective)
    every = {_EUORunnerEn.INFERENCE_METHOD, _EUORunnerMultilingual.INFERENCE_METHOD}
    agents_internals.drop_inference_runners(every - {keep})
    os.environ[EFFECTIVE_TURN_DETECTION_ENV] = plan.effective


def effective_turn_mode(config: PipelineConfig) -> TurnMode:
    """In a job process: the mode the main process settled on."""
    value = os.environ.get(EFFECTIVE_TURN_DETECTION_ENV)
    if value in ("multilingual", "english", "vad", "stt", "manual"):
        return value  # type: ignore[return-value]
    return "vad" if config.turn_detection.mode in MODEL_TYPES else config.turn_detection.mode


def build_turn_detection(mode: TurnMode) -> Any:
    if mode == "english":
        _import_turn_detector()
        from livekit.plugins.turn_detector.english import EnglishModel

        return EnglishModel()
    if mode == "multilingual":
        _import_turn_detector()
        from livekit.plugins.turn_detector.multilingual import MultilingualModel

        return MultilingualModel()
    return mode


def turn_handling(config: PipelineConfig, turn_detection: Any) -> dict[str, Any]:
    """AgentSession(turn_handling=...) from config (livekit-agents 1.8 TurnHandlingOptions)."""
    return {
        "turn_detection": turn_detection,
        "endpointing": {
            "min_delay": config.endpointing.min_delay_seconds,
            "max_delay": config.endpointing.max_delay_seconds,
        },
        "interruption": {
            "enabled": config.interruptions.enabled,
            # "adaptive" needs LiveKit Cloud inference; VAD interruption runs locally.
            "mode": "vad",
            "min_duration": config.interruptions.min_duration_seconds,
            "min_words": config.interruptions.min_words,
        },
        "preemptive_generation": {"enabled": config.preemptive_generation},
    }


@dataclass
class Pipeline:
    """Everything AgentSession needs from the pipeline config, built in a job process."""

    stt: Any
    llm: Any
    tts: Any
    vad: Any
    turn_handling: dict[str, Any]
    noise_cancellation: Any
    user_away_timeout: float | None

    def session_options(self) -> dict[str, Any]:
        options = {
            "stt": self.stt,
            "llm": self.llm,
            "tts": self.tts,
            "vad": self.vad,
            "turn_handling": self.turn_handling,
            "user_away_timeout": self.user_away_timeout,
        }
        # A realtime model hears and speaks itself: no STT, no TTS.
        return {
            key: value
            for key, value in options.items()
            if key not in ("stt", "tts") or value is not None
        }


def message_tts(config: PipelineConfig) -> TtsConfig:
    """The TTS for lines said outside a conversation (the overflow message): the pipeline's, or
    with a realtime model the same provider's TTS endpoint (OpenAI's /v1/audio/speech at the
    realtime base URL, with OPENAI_API_KEY)."""
    if config.realtime is None:
        return config.tts
    base_url = config.realtime.base_url
    if base_url is not None and base_url.startswith("ws"):
        base_url = "http" + base_url.removeprefix("ws")
    return TtsConfig(provider="openai", base_url=base_url)


def build_realtime(config: RealtimeConfig) -> Any:
    """openai.realtime.RealtimeModel from config (GA Realtime protocol over a WebSocket)."""
    from livekit.plugins import openai
    from openai.types.realtime.realtime_audio_input_turn_detection import SemanticVad, ServerVad

    detection = config.turn_detection
    turn_detection: Any
    if detection.type == "semantic_vad":
        turn_detection = SemanticVad(
            type="semantic_vad",
            eagerness=detection.eagerness,
            create_response=True,
            interrupt_response=detection.interrupt_response,
        )
    else:
        turn_detection = ServerVad(
            type="server_vad",
            threshold=detection.threshold,
            prefix_padding_ms=detection.prefix_padding_ms,
            silence_duration_ms=detection.silence_duration_ms,
            create_response=True,
            interrupt_response=detection.interrupt_response,
        )
    options: dict[str, Any] = {
        "model": config.model,
        "modalities": list(config.modalities),
        "turn_detection": turn_detection,
    }
    if config.voice:
        options["voice"] = config.voice
    if config.speed is not None:
        options["speed"] = config.speed
    if config.base_url:
        options["base_url"] = config.base_url
    if config.input_transcription_model:
        from openai.types.realtime import AudioTranscription

        options["input_audio_transcription"] = AudioTranscription(
            model=config.input_transcription_model
        )
    else:
        options["input_audio_transcription"] = None
    return openai.realtime.RealtimeModel(**options)


def prebuild_models(config: PipelineConfig) -> dict[str, Any]:
    """The call's STT, LLM and TTS, built in a job process's prewarm rather than in the call:
    each OpenAI client makes an SSL context (0.05-0.2 s idle, up to ~0.9 s measured on a busy
    2-core node), which otherwise sits between the agent joining and its greeting (issue 17).
    A job process takes one call, so nothing is shared between calls. Nothing for a realtime
    model (built in the call)."""
    if config.realtime is not None:
        return {}
    return {
        "stt": build_stt(config.stt),
        "llm": build_llm(config.llm),
        "tts": build_tts(config.tts),
    }


def build_pipeline(
    config: PipelineConfig, vad: Any | None = None, models: Mapping[str, Any] | None = None
) -> Pipeline:
    """The pipeline of one call; `models`: what prebuild_models built ahead (used as given)."""
    models = models or {}
    mode = effective_turn_mode(config)
    if config.realtime is not None:
        handling = turn_handling(config, "realtime_llm")
        return Pipeline(
            stt=None,
            llm=build_realtime(config.realtime),
            tts=None,
            vad=vad if vad is not None else load_vad(config.vad),
            turn_handling=handling,
            noise_cancellation=noise_cancellation(config.noise_cancellation),
            user_away_timeout=config.user_away_timeout_seconds,
        )
    return Pipeline(
        stt=models.get("stt") or build_stt(config.stt),
        llm=models.get("llm") or build_llm(config.llm),
        tts=models.get("tts") or build_tts(config.tts),
        vad=vad if vad is not None else load_vad(config.vad),
        turn_handling=turn_handling(config, build_turn_detection(mode)),
        noise_cancellation=noise_cancellation(config.noise_cancellation),
        user_away_timeout=config.user_away_timeout_seconds,
    )
