"""`ProviderServer`: the local provider endpoints on one real HTTP port, plus a control API.

OpenAI (openai_server.py; the Realtime WebSocket endpoint in openai_realtime_server.py),
Deepgram STT (deepgram_server.py) and ElevenLabs TTS
(elevenlabs_server.py) share the port and one `ProviderState`: the same scripted transcripts
answer whichever STT the runtime uses, and every request is recorded as chat, tts or stt.

In-process (tests):

    async with ProviderServer() as providers:
        providers.script_llm("Sure, one moment.", LLMReply(tool_calls=[ToolCall("lookup", {...})]))
        providers.script_transcripts("What are your opening hours?")
        ... openai.LLM(base_url=providers.base_url, api_key="test") ...
        providers.requests("chat")

As a process (demo, e2e): `python -m voicefleet_testkit.providers --host 0.0.0.0 --port 8300`,
scripted over
HTTP with `ProviderControl` (control.py) or plain requests:

    POST /_control/script    {"llm": [...], "transcripts": [...], "default_transcript": "..."}
    GET  /_control/requests  ?kind=chat|tts|stt   -> {"requests": [...]}
    POST /_control/reset     clears queues and recorded requests
    GET  /_control/health    {"ok": true, "pending": {"llm": n, "transcripts": n}}
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from types import TracebackType
from typing import Any

from aiohttp import web

from voicefleet_testkit.providers.deepgram_server import add_deepgram_routes
from voicefleet_testkit.providers.elevenlabs_server import add_elevenlabs_routes
from voicefleet_testkit.providers.openai_realtime_server import add_openai_realtime_routes
from voicefleet_testkit.providers.openai_server import add_openai_routes
from voicefleet_testkit.providers.script import (
    REQUEST_KINDS,
    REQUIRED_API_KEY,
    STATE_KEY,
    LLMReply,
    ProviderState,
    RequestKind,
    ScriptError,
    Transcript,
)


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _control_script(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError as error:
        return _bad_request(f"body is not JSON: {error}")
    if not isinstance(body, dict):
        return _bad_request("body must be an object with 'llm' and/or 'transcripts'")
    unknown = set(body) - {"llm", "transcripts", "default_transcript"}
    if unknown:
        return _bad_request(
            f"unknown field(s) {sorted(unknown)}; use llm, transcripts, default_transcript"
        )
    state = request.app[STATE_KEY]
    try:
        state.script(
            llm=list(body.get("llm") or []),
            transcripts=list(body.get("transcripts") or []),
            default_transcript=body.get("default_transcript"),
        )
    except ScriptError as error:
        return _bad_request(str(error))
    return web.json_response({"ok": True, "pending": state.pending()})


async def _control_requests(request: web.Request) -> web.Response:
    kind = request.query.get("kind")
    if kind is not None and kind not in REQUEST_KINDS:
        return _bad_request(f"kind must be one of {list(REQUEST_KINDS)}, got {kind!r}")
    return web.json_response({"requests": request.app[STATE_KEY].requests(kind)})


async def _control_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


async def _control_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "pending": request.app[STATE_KEY].pending()})


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # OpenAI sends one on every response; the plugins log a warning without it.
    if request.path.startswith("/v1/"):
        response.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")


def build_app(state: ProviderState, *, api_key: str | None = None) -> web.Application:
    """The aiohttp application: every provider's routes and the control API."""
    # Speech uploads of a minute or more exceed aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app[REQUIRED_API_KEY] = api_key
    app.on_response_prepare.append(_add_request_id)
    add_openai_routes(app)
    add_openai_realtime_routes(app)
    add_deepgram_routes(app)
    add_elevenlabs_routes(app)
    app.router.add_post("/_control/script", _control_script)
    app.router.add_get("/_control/requests", _control_requests)
    app.router.add_post("/_control/reset", _control_reset)
    app.router.add_get("/_control/health", _control_health)
    return app


def openai_pipeline(base_url: str) -> dict[str, Any]:
    """A VoiceAgent's `spec.pipeline` on OpenAI-compatible endpoints at `base_url` (a
    ProviderServer's base_url): STT, LLM and TTS, with Silero VAD and VAD turn detection."""
    openai = {"provider": "openai", "baseUrl": base_url}
    return {
        "stt": {**openai, "model": "whisper-1", "language": "en"},
        "llm": {**openai, "model": "gpt-4o-mini"},
        "tts": {**openai, "model": "tts-1", "voice": "alloy"},
        "vad": {"provider": "silero"},
        "turnDetection": {"mode": "vad"},
    }


# The provider each part of a pipeline uses when the spec leaves it out (the runtime's defaults).
DEFAULT_PROVIDERS = {"stt": "deepgram", "llm": "openai", "tts": "elevenlabs"}


def pointed_at(pipeline: dict[str, Any], url: str) -> dict[str, Any]:
    """A copy of a VoiceAgent's `spec.pipeline` (e.g. the example's) with its STT, LLM and TTS
    endpoints pointed at a ProviderServer whose root URL is `url` (`ProviderServer.url`):
    Deepgram takes the root (the runtime appends /v1/listen), OpenAI and ElevenLabs the /v1
    base. Providers, models, VAD and turn detection stay as the spec has them."""
    pointed = copy.deepcopy(pipeline)
    for part, default in DEFAULT_PROVIDERS.items():
        settings = pointed.setdefault(part, {})
        provider = settings.get("provider", default)
        settings["baseUrl"] = url if provider == "deepgram" else f"{url}/v1"
    return pointed


class ProviderServer:
    """The provider servers on a real port. `port=0` picks a free one.

    `api_key`: when set, requests must carry exactly this bearer key (checks that secrets
    reach the runtime); otherwise any non-empty key is accepted.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        default_transcript: str | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.state = ProviderState()
        if default_transcript is not None:
            self.state.default_transcript = default_transcript
        self._app = build_app(self.state, api_key=api_key)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> ProviderServer:
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ProviderServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ProviderServer is not started; await start() first")
        return self._port

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:8300 (control API under /_control)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, what `openai.LLM/TTS/STT(base_url=...)` take."""
        return f"{self.url}/v1"

    @property
    def deepgram_url(self) -> str:
        """What `deepgram.STT(base_url=...)` takes (its default is .../v1/listen too)."""
        return f"{self.url}/v1/listen"

    @property
    def elevenlabs_base_url(self) -> str:
        """What `elevenlabs.TTS(base_url=...)` takes."""
        return f"{self.url}/v1"

    def script_llm(self, *replies: LLMReply | str | dict[str, Any]) -> None:
        self.state.script(llm=list(replies))

    def script_transcripts(self, *transcripts: Transcript | str | dict[str, Any]) -> None:
        self.state.script(transcripts=list(transcripts))

    def requests(self, kind: RequestKind | None = None) -> list[dict[str, Any]]:
        return self.state.requests(kind)

    def reset(self) -> None:
        self.state.reset()

    async def wait_for_requests(
        self, kind: RequestKind, count: int = 1, timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until at least `count` requests of `kind` arrived; raise with what did."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.requests(kind)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"expected {count} {kind} request(s) within {timeout_s}s, got {len(found)}; "
                    f"all requests so far: {[r['kind'] for r in self.requests()]}"
                )
            await asyncio.sleep(0.05)
        return found
