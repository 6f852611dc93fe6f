"""noiseCancellation bvc against the self-hosted livekit-server (livekit-plugins-noise-cancellation
0.3.2): what a call gets, and that it gets a call at all.

The plugin's filter asks the LiveKit server to authorize it; a self-hosted livekit-server answers
404, the filter logs `noise cancellation is not authorized for this connection` and the caller's
audio goes through unfiltered: the question is heard and answered. That is why the operator
refuses the mode on a self-hosted platform (platform_features.py, tests/integration/
test_operator.py). Before the runtime stopped preloading the plugin in the forkserver, every
call with the mode crashed at ctx.connect() (livekit.rtc used before fork) and no agent joined.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_testkit.providers import LLMReply, ProviderServer
from voicefleet_testkit.waiting import wait_until

from tests.integration.test_runtime_worker import (
    GREETING,
    RuntimeWorker,
    Webhooks,
    dispatched_call,
    runtime_config,
)

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 'msg="noise cancellation is not authorized for this connection" status=404'


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    await hooks.start()
    yield hooks
    await hooks.runner.cleanup()


async def test_bvc_on_a_self_hosted_livekit_is_not_authorized_and_passes_audio_through(
    livekit: LiveKitEndpoint,
    providers: ProviderServer,
    webhooks: Webhooks,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dispatch_name = f"nc-{uuid.uuid4().hex[:6]}"
    config = runtime_config(dispatch_name, providers.base_url, webhooks.url)
    config["pipeline"]["noiseCancellation"] = {"mode": "bvc"}
    question = "Where is my order please?"
    providers.script_transcripts(question)
    providers.script_llm(LLMReply("It is on its way.", match="order"))
    worker = RuntimeWorker(livekit, config, tmp_path / "worker")
    worker.start()
    try:
        await worker.wait_registered()
        async with dispatched_call(livekit, dispatch_name) as call:
            greeting_s = await call.wait_for_greeting()  # no crash: the agent joined and spoke
            await call.ask(question)
            said = call.caller.said()
        assert GREETING in said and question in said and "It is on its way." in said, said
        await wait_until(
            "the filter's refusal in the worker's log",
            lambda: NOT_AUTHORIZED in worker.log(),
            10,
            describe=worker.log_tail,
        )
        assert "job crashed" not in worker.log()
        refusals = worker.log().count(NOT_AUTHORIZED)
        print(
            "noise cancellation:",
            json.dumps({"greeting_s": round(greeting_s, 2), "refusals": refusals}),
        )
        record_property("not_authorized_log_lines", refusals)
    finally:
        await worker.stop()
