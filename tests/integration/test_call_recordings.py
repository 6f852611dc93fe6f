"""Call recordings against a real livekit-server and a real S3-compatible server (versitygw from
localdev, the `s3` fixture): a WebRTC call with spec.callRecords.recording -> the object is in
the bucket under the key the record names, its length matches the call, and it holds both
voices (the caller on the left channel, the agent on the right)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from voicefleet_localdev.livekit import LiveKitEndpoint, S3Endpoint
from voicefleet_runtime.config import CallRecordingConfig
from voicefleet_runtime.recording import get_object
from voicefleet_testkit.providers import LLMReply, ProviderServer
from voicefleet_testkit.s3 import create_bucket
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_call_records import (
    Receiver,
    check_signed,
    receiver,  # noqa: F401  (fixture)
    records_config,
    records_worker,
    report,
    webhooks,  # noqa: F401  (fixture)
)
from tests.integration.test_runtime_worker import GREETING, Webhooks, dispatched_call

pytestmark = pytest.mark.integration

QUESTION = "What are your opening hours?"


def decode(ogg: bytes) -> tuple[np.ndarray[Any, Any], int]:
    """(samples as [channels, n] float32, sample rate) of an Ogg/Opus file."""
    chunks = []
    rate = 0
    with av.open(io.BytesIO(ogg), mode="r") as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            rate = frame.sample_rate
            samples = frame.to_ndarray()
            if samples.shape[0] != stream.channels:  # packed layout: [1, n * channels]
                samples = samples.reshape(-1, stream.channels).T
            chunks.append(samples.astype(np.float32))
    return np.concatenate(chunks, axis=1), rate


def rms(samples: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


async def test_call_recording_is_in_the_bucket_with_both_voices(
    livekit: LiveKitEndpoint,
    s3: S3Endpoint,
    providers: ProviderServer,
    webhooks: Webhooks,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    bucket = f"calls-{uuid.uuid4().hex[:8]}"
    await create_bucket(s3, bucket)
    dispatch_name = f"recording-{uuid.uuid4().hex[:6]}"
    config = records_config(dispatch_name, providers.base_url, webhooks.url, receiver)
    storage = {
        "endpoint": s3.url,
        "bucket": bucket,
        "prefix": "acme/",
        "region": s3.region,
        "accessKeyIdFromEnv": "RECORDINGS_ACCESS_KEY_ID",
        "secretAccessKeyFromEnv": "RECORDINGS_SECRET_ACCESS_KEY",
    }
    config["callRecords"]["recording"] = storage
    providers.script_transcripts(QUESTION)
    providers.script_llm(LLMReply("We are open from nine to five.", match="opening hours"))
    worker = records_worker(livekit, config, tmp_path / "worker")
    worker.env["RECORDINGS_ACCESS_KEY_ID"] = s3.access_key
    worker.env["RECORDINGS_SECRET_ACCESS_KEY"] = s3.secret_key
    worker.start()
    try:
        await worker.wait_registered()
        async with dispatched_call(livekit, dispatch_name) as call:
            await call.wait_for_greeting()
            await call.ask(QUESTION)
            room = call.room
        await wait_until(
            "the call's record at the receiver",
            lambda: bool(receiver.records_for(room)),
            60,
            describe=worker.log_tail,
        )
        [delivery] = receiver.records_for(room).values()
        record = check_signed(delivery)
        recording = record.recording
        assert recording is not None, worker.log_tail()
        assert recording.bucket == bucket
        assert recording.object_key == f"acme/{record.record_id}.ogg"
        assert recording.content_type == "audio/ogg"
        assert recording.started_at is not None

        async with aiohttp.ClientSession() as session:
            body = await get_object(
                session,
                CallRecordingConfig.model_validate(storage),
                (s3.access_key, s3.secret_key),
                recording.object_key,
            )
        samples, rate = decode(body)
        assert samples.shape[0] == 2, samples.shape
        duration = samples.shape[1] / rate
        assert abs(duration - recording.duration_seconds) < 0.1
        call_length = (record.ended_at - recording.started_at).total_seconds()
        assert abs(duration - call_length) < 1.0, (duration, call_length)

        def window(turn_text: str, channel: int) -> np.ndarray[Any, Any]:
            [turn] = [t for t in record.transcript if t.text == turn_text]
            assert turn.ended_at is not None and recording.started_at is not None
            start = (turn.started_at - recording.started_at).total_seconds()
            end = (turn.ended_at - recording.started_at).total_seconds()
            return samples[channel, max(0, int(start * rate)) : int(end * rate)]

        caller_left = rms(window(QUESTION, 0))
        agent_right = rms(window(GREETING, 1))
        assert caller_left > 0.01, caller_left  # the caller's question, left channel
        assert agent_right > 0.01, agent_right  # the agent's greeting, right channel
        # Stereo, not mixed: each voice is (nearly) absent from the other's channel.
        assert rms(window(QUESTION, 1)) < caller_left / 4
        assert rms(window(GREETING, 0)) < agent_right / 4
        report(
            record_property,
            recording_seconds=round(duration, 3),
            call_seconds=round(call_length, 3),
            recording_bytes=len(body),
            caller_left_rms=round(caller_left, 4),
            agent_right_rms=round(agent_right, 4),
        )
    finally:
        await worker.stop()
