"""Call recordings: the call's audio, recorded in the job and uploaded to the tenant's bucket.

What is recorded. livekit-agents' RecorderIO (AgentSession.start(record={"audio": True, ...}))
taps the session's own audio input and output and writes one Ogg/Opus file, **stereo: the caller
on the left channel, the agent on the right**, both on one timeline (silence where nobody
spoke). Stereo rather than mixed: each party can be transcribed, measured (talk time, overlap,
interruptions) or redacted on its own, and a player still plays both voices; mixing later is
trivial, unmixing is impossible. The other parts of livekit-agents' recording (traces, logs,
transcript) stay off: they only go to LiveKit Cloud.

Upload. When the call ends the job process PUTs the file to
`<endpoint>/<bucket>/<prefix><recordId>.ogg` (path-style addressing, which every S3-compatible
server accepts) with AWS Signature Version 4, signed here with the standard library (no SDK in
the image); a failed upload is retried twice, then logged and counted
(voicefleet_errors_total{component="recording"}), and the record goes out without `recording`.
The object key and duration are put into the call's record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from voicefleet_runtime.config import CallRecordingConfig

logger = logging.getLogger("voicefleet.runtime.recording")

RECORD_AUDIO_ONLY = {
    "audio": True,
    "traces": False,
    "logs": False,
    "transcript": False,
    "redaction": False,
}
"""AgentSession.start(record=...): the session's audio to a local file, nothing to the cloud."""
RECORDING_FILE = "audio.ogg"
"""RecorderIO's file in the job's session directory."""
CONTENT_TYPE = "audio/ogg"
UPLOAD_ATTEMPTS = 3
UPLOAD_TIMEOUT_SECONDS = 30.0
ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# --- AWS Signature Version 4 ---------------------------------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    key = _hmac(("AWS4" + secret_key).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_sha256: str,
    *,
    region: str,
    access_key: str,
    secret_key: str,
    now: dt.datetime,
) -> dict[str, str]:
    """The request's headers plus x-amz-date, x-amz-content-sha256 and Authorization.

    `url` must already be percent-encoded (it is used as is, as the canonical URI); every header
    given, and host, is signed."""
    parts = urlsplit(url)
    amz_date = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    signed = {
        "host": parts.netloc,
        **{name.lower(): value.strip() for name, value in headers.items()},
        "x-amz-content-sha256": payload_sha256,
        "x-amz-date": amz_date,
    }
    names = sorted(signed)
    canonical_query = "&".join(
        sorted(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, _, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
        )
    )
    canonical_request = "\n".join(
        [
            method,
            parts.path or "/",
            canonical_query,
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{date}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    signature = hmac.new(
        signing_key(secret_key, date, region), string_to_sign.encode(), hashlib.sha256
    ).hexdigest()
    authorization = (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, "
        f"Signature={signature}"
    )
    result = {name: value for name, value in signed.items() if name != "host"}
    result["Authorization"] = authorization
    return result


def object_url(storage: CallRecordingConfig, key: str) -> str:
    """Path-style URL of an object, percent-encoded once (S3's canonical URI)."""
    return f"{storage.endpoint.rstrip('/')}/{storage.bucket}/{quote(key, safe='/-_.~')}"


def object_key(storage: CallRecordingConfig, record_id: str) -> str:
    return f"{storage.prefix}{record_id}.ogg"


class S3Error(RuntimeError):
    """The bucket refused or did not answer."""


async def put_object(
    session: aiohttp.ClientSession,
    storage: CallRecordingConfig,
    credentials: tuple[str, str],
    key: str,
    body: bytes,
    content_type: str = CONTENT_TYPE,
) -> None:
    url = object_url(storage, key)
    headers = sign(
        "PUT",
        url,
        {"content-type": content_type},
        hashlib.sha256(body).hexdigest(),
        region=storage.region,
        access_key=credentials[0],
        secret_key=credentials[1],
        now=dt.datetime.now(dt.UTC),
    )
    async with session.put(URL(url, encoded=True), data=body, headers=headers) as response:
        if response.status // 100 != 2:
            text = (await response.text(errors="replace"))[:300]
            raise S3Error(f"PUT {key}: HTTP {response.status}: {text}")


async def get_object(
    session: aiohttp.ClientSession,
    storage: CallRecordingConfig,
    credentials: tuple[str, str],
    key: str,
) -> bytes:
    """Read an object back (tests, and a tenant's own tooling)."""
    url = object_url(storage, key)
    headers = sign(
        "GET",
        url,
        {},
        EMPTY_SHA256,
        region=storage.region,
        access_key=credentials[0],
        secret_key=credentials[1],
        now=dt.datetime.now(dt.UTC),
    )
    async with session.get(URL(url, encoded=True), headers=headers) as response:
        body = await response.read()
        if response.status != 200:
            raise S3Error(f"GET {key}: HTTP {response.status}: {body[:300]!r}")
        return body


# --- the recording file --------------------------------------------------------------------------


def audio_duration(path: Path) -> float:
    """Seconds of audio in the file (decoded, so it does not rely on container metadata)."""
    import av

    samples = 0
    rate = 0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate or rate
    return samples / rate if rate else 0.0


def credentials(storage: CallRecordingConfig, environ: Mapping[str, str]) -> tuple[str, str]:
    return environ[storage.access_key_id_from_env], environ[storage.secret_access_key_from_env]


async def upload_recording(
    storage: CallRecordingConfig,
    environ: Mapping[str, str],
    path: Path,
    record_id: str,
) -> tuple[str, float]:
    """Upload the call's recording; returns (object key, duration in seconds)."""
    duration = await asyncio.to_thread(audio_duration, path)
    body = await asyncio.to_thread(path.read_bytes)
    key = object_key(storage, record_id)
    keys = credentials(storage, environ)
    timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                await put_object(session, storage, keys, key, body)
                break
            except (S3Error, aiohttp.ClientError, TimeoutError) as error:
                if attempt == UPLOAD_ATTEMPTS:
                    raise S3Error(f"upload of {key} failed {attempt} times: {error}") from error
                logger.warning("recording upload attempt %d failed: %s", attempt, error)
                await asyncio.sleep(attempt)
    logger.info(
        "recording uploaded: %s/%s (%.1fs, %d bytes)", storage.bucket, key, duration, len(body)
    )
    return key, duration
