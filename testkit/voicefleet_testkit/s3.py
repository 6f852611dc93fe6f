"""The S3 store as tests and the demo use it: create a bucket with one SigV4-signed request
(the runtime's own signer, `voicefleet_runtime.recording.sign`), on any S3-compatible endpoint
(the local versitygw: `voicefleet_localdev.livekit.S3Endpoint`)."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

import aiohttp
from voicefleet_runtime.recording import EMPTY_SHA256, sign
from yarl import URL


class S3Account(Protocol):
    """Where the store is and the credentials to use (path-style URLs)."""

    @property
    def url(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...


async def create_bucket(s3: S3Account, bucket: str) -> None:
    """PUT /<bucket>; fails naming the store's answer unless it is 200."""
    url = f"{s3.url}/{bucket}"
    headers = sign(
        "PUT",
        url,
        {},
        EMPTY_SHA256,
        region=s3.region,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        now=dt.datetime.now(dt.UTC),
    )
    async with aiohttp.ClientSession() as session:
        async with session.put(URL(url, encoded=True), headers=headers) as response:
            body = await response.text()
            assert response.status == 200, f"creating bucket {bucket} at {s3.url}: {body}"
