"""A standby LiveKit agent worker: registers under a dispatch name and answers job offers,
speaking LiveKit's agent protocol itself (the operator image has no livekit-agents).

Why it exists (runtime/README.md, "Admission and overflow"; livekit-server v1.13.5): a dispatch
for an agent name no worker has registered is dropped ("not dispatching agent job since no
worker is available", pkg/agent/client.go:149) and never retried, not even when a worker
registers later (pkg/rtc/room.go launches a room's dispatches only when the room starts or a
dispatch is added). So a fleet scaled to zero would lose every caller. The operator keeps one
of these registered under each sleeping fleet's dispatch name (wake.py): the server offers it
the job, and the standby answers in one of two ways:

- TAKE: `available=false, terminate=true`. The server ends the job as successful at once
  (pkg/agent/worker.go:375: no retry, no agent participant, no token). The room and its caller
  stay: livekit-sip keeps a phone caller ringing until an agent publishes audio
  (pkg/sip/inbound.go waitSubscribe), a WebRTC caller stays in its room. The dispatch is
  re-created for the fleet's first worker (AgentDispatchService.CreateDispatch, which adds a
  dispatch to the existing room and launches its job at once, pkg/rtc/room.go AddAgentDispatch).
- REFUSE: `available=false, terminate=false`. The server tries its other available workers of
  that name at once (pkg/service/agentservice.go, `attempted`), i.e. the fleet's own workers.

The standby reports itself AVAILABLE with load 0 (the server's defaults for a new worker) and
never accepts a job, so it never joins a room.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from urllib.parse import urljoin, urlparse

import aiohttp
from livekit import api as livekit_api
from livekit.protocol import agent, models

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
"""WebSocket ping interval (aiohttp answers the server's pings itself)."""
RETRY_SECONDS = (1.0, 2.0, 5.0)
"""Waits between reconnection attempts (the last one repeats)."""
VERSION = "voicefleet-standby"


class Answer(enum.Enum):
    TAKE = "take"
    """End the job at once without an agent; the caller waits in its room for the handover."""
    REFUSE = "refuse"
    """Let the server offer the job to another worker of the same name."""


def agent_url(livekit_url: str) -> str:
    """`ws(s)://host[:port][/path]/agent` from a LiveKit URL (ws, wss, http or https)."""
    parsed = urlparse(livekit_url)
    scheme = parsed.scheme.replace("http", "ws", 1) if parsed.scheme.startswith("http") else ""
    scheme = scheme or parsed.scheme
    base = f"{scheme}://{parsed.netloc}{parsed.path}".rstrip("/") + "/"
    return urljoin(base, "agent")


def register_message(agent_name: str) -> agent.WorkerMessage:
    message = agent.WorkerMessage()
    message.register.type = agent.JT_ROOM
    message.register.agent_name = agent_name
    message.register.version = VERSION
    message.register.allowed_permissions.CopyFrom(
        models.ParticipantPermission(can_publish=False, can_subscribe=False, agent=True)
    )
    return message


def availability_message(job_id: str, answer: Answer) -> agent.WorkerMessage:
    message = agent.WorkerMessage()
    message.availability.job_id = job_id
    message.availability.available = False
    message.availability.terminate = answer is Answer.TAKE
    return message


class StandbyWorker:
    """One registration under `agent_name`; `decide(job)` answers every offer (synchronously,
    so that the answer goes back at once). Run `run()` as a task; cancel it to unregister (the
    server forgets a worker when its connection closes)."""

    def __init__(
        self,
        livekit_url: str,
        api_key: str,
        api_secret: str,
        agent_name: str,
        decide: Callable[[agent.Job], Answer],
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.url = agent_url(livekit_url)
        self.api_key = api_key
        self.api_secret = api_secret
        self.agent_name = agent_name
        self.decide = decide
        self.on_registered = on_registered
        """Called after each (re-)registration."""
        self.registered = asyncio.Event()
        self.worker_id = ""

    def _token(self) -> str:
        return (
            livekit_api.AccessToken(self.api_key, self.api_secret)
            .with_grants(livekit_api.VideoGrants(agent=True))
            .to_jwt()
        )

    async def run(self) -> None:
        attempt = 0
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self._connection(session)
                    attempt = 0
                except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                    log.warning(
                        "standby %s: connection to %s failed: %s", self.agent_name, self.url, error
                    )
                finally:
                    self.registered.clear()
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                await asyncio.sleep(delay)

    async def _connection(self, session: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Bearer {self._token()}"}
        async with session.ws_connect(
            self.url,
            headers=headers,
            heartbeat=HEARTBEAT_SECONDS,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        ) as ws:
            await ws.send_bytes(register_message(self.agent_name).SerializeToString())
            first = agent.ServerMessage()
            first.ParseFromString(await asyncio.wait_for(ws.receive_bytes(), 10))
            if not first.HasField("register"):
                raise ValueError("the server's first message was not the registration")
            self.worker_id = first.register.worker_id
            self.registered.set()
            log.info("standby %s: registered (worker %s)", self.agent_name, self.worker_id)
            if self.on_registered is not None:
                self.on_registered()
            async for frame in ws:
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                        break
                    continue
                message = agent.ServerMessage()
                message.ParseFromString(frame.data)
                if message.HasField("availability"):
                    job = message.availability.job
                    try:
                        answer = self.decide(job)
                    except Exception:  # an answer must always go back: let another worker try
                        log.exception("standby %s: deciding on job %s", self.agent_name, job.id)
                        answer = Answer.REFUSE
                    await ws.send_bytes(availability_message(job.id, answer).SerializeToString())
                elif message.HasField("go_away"):
                    break
            log.info("standby %s: connection closed", self.agent_name)
