"""Audio for the provider servers and the test participant: real speech from espeak-ng,
decoding, resampling and encoding with PyAV, and loudness measures.

Audio is carried as `PcmAudio`: mono signed 16-bit samples plus their sample rate.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import wave
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import numpy.typing as npt

ESPEAK_BINARY = "espeak-ng"
DEFAULT_ESPEAK_VOICE = "en-us"
DEFAULT_WORDS_PER_MINUTE = 175

# Below this RMS (full scale = 1.0, about -50 dBFS) a stretch of audio counts as silence.
SILENCE_RMS = 0.003

# OpenAI `response_format` -> (PyAV container format, codec, content type, codec sample rate).
_ENCODINGS: dict[str, tuple[str, str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg", None),
    "opus": ("ogg", "libopus", "audio/opus", 48000),
    "aac": ("adts", "aac", "audio/aac", None),
    "flac": ("flac", "flac", "audio/flac", None),
}
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    **{name: spec[2] for name, spec in _ENCODINGS.items()},
}


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class PcmAudio:
    """Mono signed 16-bit PCM."""

    samples: npt.NDArray[np.int16]
    sample_rate: int

    @classmethod
    def silence(cls, seconds: float, sample_rate: int) -> PcmAudio:
        return cls(np.zeros(round(seconds * sample_rate), dtype=np.int16), sample_rate)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def rms(self) -> float:
        return rms(self.samples)

    def to_bytes(self) -> bytes:
        return self.samples.astype("<i2").tobytes()

    def to_wav_bytes(self) -> bytes:
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(self.sample_rate)
            wav.writeframes(self.to_bytes())
        return buffer.getvalue()

    def resample(self, sample_rate: int) -> PcmAudio:
        if sample_rate == self.sample_rate or len(self.samples) == 0:
            return PcmAudio(self.samples, sample_rate) if len(self.samples) == 0 else self
        frame = av.AudioFrame.from_ndarray(self.samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        return PcmAudio(np.concatenate(chunks).astype(np.int16), sample_rate)

    def __add__(self, other: PcmAudio) -> PcmAudio:
        other = other.resample(self.sample_rate)
        return PcmAudio(np.concatenate([self.samples, other.samples]), self.sample_rate)


def rms(samples: npt.NDArray[np.int16]) -> float:
    """Root mean square of int16 samples, full scale = 1.0 (0.0 for no samples)."""
    if len(samples) == 0:
        return 0.0
    as_float = samples.astype(np.float64) / 32768.0
    return float(math.sqrt(float(np.mean(as_float * as_float))))


def dbfs(value: float) -> float:
    """An RMS value in dB relative to full scale (-inf for digital silence)."""
    return 20 * math.log10(value) if value > 0 else float("-inf")


def is_silent(samples: npt.NDArray[np.int16], threshold: float = SILENCE_RMS) -> bool:
    return rms(samples) < threshold


def _parse_espeak_wav(data: bytes) -> PcmAudio:
    # espeak-ng --stdout writes a streaming header whose sizes are placeholders (0x7ffff...),
    # which the wave module rejects; the fmt chunk and the data offset are still right.
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechSynthesisError("espeak-ng --stdout did not produce a WAV stream")
    fmt_at = data.index(b"fmt ")
    channels = int.from_bytes(data[fmt_at + 10 : fmt_at + 12], "little")
    sample_rate = int.from_bytes(data[fmt_at + 12 : fmt_at + 16], "little")
    bits = int.from_bytes(data[fmt_at + 22 : fmt_at + 24], "little")
    if channels != 1 or bits != 16:
        raise SpeechSynthesisError(f"espeak-ng produced {channels}ch/{bits}bit, expected mono/16")
    data_at = data.index(b"data", fmt_at) + 8
    payload = data[data_at:]
    payload = payload[: len(payload) - len(payload) % 2]
    return PcmAudio(np.frombuffer(payload, dtype="<i2").astype(np.int16), sample_rate)


async def synthesize(
    text: str,
    *,
    voice: str = DEFAULT_ESPEAK_VOICE,
    words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
    sample_rate: int | None = None,
) -> PcmAudio:
    """Speak `text` with espeak-ng; resampled to `sample_rate` when given."""
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise SpeechSynthesisError(
            f"{ESPEAK_BINARY} is not on PATH; install it (apt-get install espeak-ng, "
            "or `make infra`) so the provider servers can speak"
        )
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--stdout",
        "-v",
        voice,
        "-s",
        str(words_per_minute),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # Text on stdin, so nothing in it can be taken for an option.
    out, err = await proc.communicate(text.encode())
    if proc.returncode != 0:
        raise SpeechSynthesisError(
            f"espeak-ng failed (exit {proc.returncode}) for voice {voice!r}: "
            f"{err.decode(errors='replace').strip()}"
        )
    audio = _parse_espeak_wav(out)
    return audio.resample(sample_rate) if sample_rate else audio


def decode_audio(data: bytes) -> PcmAudio:
    """Decode any container/codec PyAV knows (WAV, MP3, Ogg/Opus, ...) to mono 16-bit PCM."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        chunks: list[npt.NDArray[Any]] = []
        for frame in container.decode(stream):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    samples = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    return PcmAudio(samples, rate)


def encode_audio(audio: PcmAudio, response_format: str) -> tuple[bytes, str]:
    """Encode as an OpenAI `response_format` (pcm, wav, mp3, opus, aac, flac).

    Returns the bytes and the Content-Type OpenAI answers with. `pcm` is raw little-endian
    16-bit at the audio's own rate (OpenAI's is 24 kHz, so pass 24 kHz audio).
    """
    if response_format == "pcm":
        return audio.to_bytes(), CONTENT_TYPES["pcm"]
    if response_format == "wav":
        return audio.to_wav_bytes(), CONTENT_TYPES["wav"]
    if response_format not in _ENCODINGS:
        raise ValueError(
            f"response_format {response_format!r} is not supported; "
            f"use one of {sorted(CONTENT_TYPES)}"
        )
    container_format, codec, content_type, codec_rate = _ENCODINGS[response_format]
    source = audio.resample(codec_rate) if codec_rate else audio
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=source.sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(
            source.samples.reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = source.sample_rate
        # PyAV converts the sample format and re-chunks to the codec's frame size.
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue(), content_type


class StreamingEncoder:
    """One continuous encoded stream fed piece by piece (ElevenLabs sends one per context).

    Concatenating separately encoded files would put a second header (ID3, Ogg BOS page)
    mid-stream, which decoders reject; this keeps a single encoder open instead.
    """

    def __init__(self, codec_name: str, sample_rate: int) -> None:
        self.codec_name = codec_name
        self.sample_rate = sample_rate
        self._buffer = io.BytesIO()
        self._read = 0
        self._container: Any = None
        self._stream: Any = None
        if codec_name == "pcm":
            return
        if codec_name not in ("mp3", "opus"):
            raise ValueError(f"streaming codec {codec_name!r} is not supported; use pcm, mp3, opus")
        container_format, codec, _, codec_rate = _ENCODINGS[codec_name]
        # No ID3 tag or Xing header (rewritten by seeking back at the end); short Ogg pages so
        # audio leaves as it is encoded.
        options = (
            {"id3v2_version": "0", "write_xing": "0"}
            if codec_name == "mp3"
            else {"page_duration": "20000"}
        )
        self._container = av.open(self._buffer, mode="w", format=container_format, options=options)
        self._encode_rate = codec_rate or sample_rate
        self._stream = self._container.add_stream(codec, rate=self._encode_rate, layout="mono")

    def _drain(self) -> bytes:
        data = self._buffer.getvalue()[self._read :]
        self._read += len(data)
        return data

    def encode(self, audio: PcmAudio) -> bytes:
        """Encode more audio; returns the bytes produced so far that were not returned yet."""
        if self._container is None:
            return audio.resample(self.sample_rate).to_bytes()
        source = audio.resample(self._encode_rate)
        frame = av.AudioFrame.from_ndarray(
            source.samples.reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self._encode_rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._drain()

    def close(self) -> bytes:
        """Flush the encoder and the container; returns the last bytes."""
        if self._container is None:
            return b""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self._drain()
