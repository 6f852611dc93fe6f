"""`ProviderControl`: script and read a provider server running in another process.

control = ProviderControl("http://127.0.0.1:8300")
await control.script(llm=["Hi!"], transcripts=["What time is it?"])
chats = await control.wait_for_requests("chat", 1)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from voicefleet_testkit.providers.script import LLMReply, RequestKind, Transcript


class ProviderControlError(RuntimeError):
    """The provider server refused a control call or is unreachable."""


def _jsonable(item: LLMReply | Transcript | str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(item, LLMReply):
        reply = item.to_json()
        reply.pop("scripted", None)
        return reply
    if isinstance(item, Transcript):
        return {"text": item.text, "delay": item.delay}
    return item


class ProviderControl:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.request(method, self.url + path, json=json, params=params) as response,
            ):
                body: dict[str, Any] = await response.json()
                if response.status != 200:
                    raise ProviderControlError(
                        f"{method} {self.url}{path} -> {response.status}: {body.get('error')}"
                    )
                return body
        except aiohttp.ClientError as error:
            raise ProviderControlError(
                f"provider server at {self.url} is unreachable ({error}); start it with "
                "`python -m voicefleet_testkit.providers --port <port>`"
            ) from error

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/_control/health")

    async def script(
        self,
        *,
        llm: list[LLMReply | str | dict[str, Any]] | None = None,
        transcripts: list[Transcript | str | dict[str, Any]] | None = None,
        default_transcript: str | None = None,
    ) -> dict[str, int]:
        body: dict[str, Any] = {
            "llm": [_jsonable(r) for r in llm or []],
            "transcripts": [_jsonable(t) for t in transcripts or []],
        }
        if default_transcript is not None:
            body["default_transcript"] = default_transcript
        pending: dict[str, int] = (await self._call("POST", "/_control/script", json=body))[
            "pending"
        ]
        return pending

    async def script_llm(self, *replies: LLMReply | str | dict[str, Any]) -> dict[str, int]:
        return await self.script(llm=list(replies))

    async def script_transcripts(
        self, *transcripts: Transcript | str | dict[str, Any]
    ) -> dict[str, int]:
        return await self.script(transcripts=list(transcripts))

    async def requests(self, kind: RequestKind | None = None) -> list[dict[str, Any]]:
        params = {"kind": str(kind)} if kind else None
        found: list[dict[str, Any]] = (
            await self._call("GET", "/_control/requests", params=params)
        )["requests"]
        return found

    async def reset(self) -> None:
        await self._call("POST", "/_control/reset")

    async def wait_for_requests(
        self, kind: RequestKind, count: int = 1, timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(found := await self.requests(kind)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"expected {count} {kind} request(s) at {self.url} within {timeout_s}s, "
                    f"got {len(found)}"
                )
            await asyncio.sleep(0.2)
        return found
