"""Each private livekit-agents name in voicefleet_runtime.agents_internals, checked against the
installed livekit-agents: an upgrade that renames or changes one fails here, not in a call."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import aiohttp
import pytest
from livekit import rtc
from livekit.agents import AgentServer, JobContext
from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.job import JobAcceptArguments, RunningJobInfo
from livekit.protocol import agent as agent_pb
from voicefleet_runtime import agents_internals
from voicefleet_testkit.net import free_port


def test_reconnecting_follows_the_connection_task() -> None:
    server = AgentServer()
    assert agents_internals.is_reconnecting(server) is False
    # The connection task raises the flag for each (re)connect and lowers it on registration.
    source = inspect.getsource(AgentServer)
    assert "self._connecting = True" in source
    assert "self._connecting = False" in source
    server._connecting = True
    assert agents_internals.is_reconnecting(server) is True


def test_a_renamed_flag_raises_instead_of_answering_a_default() -> None:
    with pytest.raises(AttributeError):
        agents_internals.is_reconnecting(SimpleNamespace())  # type: ignore[arg-type]


async def test_dispatch_received_at_reads_the_job_info() -> None:
    info = RunningJobInfo(
        accept_arguments=JobAcceptArguments(name="agent", identity="agent-1", metadata=""),
        job=agent_pb.Job(id="AJ_test"),
        url="ws://127.0.0.1:7880",
        token="token",
        worker_id="AW_test",
        fake_job=False,
        received_at=1234.5,
    )
    ctx = JobContext(
        proc=SimpleNamespace(),  # type: ignore[arg-type]
        info=info,
        room=rtc.Room(),
        on_connect=lambda: None,
        on_shutdown=lambda _reason: None,
        inference_executor=SimpleNamespace(),
    )
    assert agents_internals.dispatch_received_at(ctx) == 1234.5


def test_worker_load_is_what_the_load_task_stores() -> None:
    # AgentServer.run() creates it, and its load task updates it from the load function.
    run_source = inspect.getsource(AgentServer.run)
    assert "self._worker_load: float = 0.0" in run_source
    assert "self._worker_load = await self._invoke_load_fnc()" in run_source
    server = AgentServer()
    server._worker_load = 0.25
    assert agents_internals.worker_load(server) == 0.25


def test_inference_runners_are_registered_by_method_and_can_be_dropped() -> None:
    from livekit.plugins.turn_detector.english import _EUORunnerEn

    registry = _InferenceRunner.registered_runners
    assert isinstance(registry, dict)
    method = _EUORunnerEn.INFERENCE_METHOD
    saved = registry.get(method)
    registry[method] = _EUORunnerEn
    try:
        agents_internals.drop_inference_runners({method, "never-registered"})
        assert method not in registry
    finally:
        if saved is not None:
            registry[method] = saved


async def test_http_server_serves_routes_added_to_its_app() -> None:
    port = free_port()
    http = agents_internals.HttpServer("127.0.0.1", port)

    async def hello(_request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="hello")

    http.app.add_routes([aiohttp.web.get("/hello", hello)])
    await http.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/hello") as response,
        ):
            assert (response.status, await response.text()) == (200, "hello")
    finally:
        await asyncio.wait_for(http.aclose(), 10)
