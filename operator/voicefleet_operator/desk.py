"""The operator's side of the platform desk (runtime desk.py; contract in
voicefleet_runtime.desk_contract): ask it to hold a caller with the VoiceAgent's
`spec.overflow.holdMessage` while the fleet wakes, and to say `spec.overflow.message` when no
worker comes in time. The desk has no LiveKit credential: each hold carries a token minted here
for that one room (join, publish, own attributes; no room admin, no other room)."""

from __future__ import annotations

import logging
from datetime import timedelta
from urllib.parse import quote

import aiohttp
from livekit import api as livekit_api
from pydantic import ValidationError
from voicefleet_runtime.desk_contract import (
    DESK_ATTRIBUTE,
    FLEET_ATTRIBUTE,
    Finished,
    FinishRequest,
    HoldRequest,
)

log = logging.getLogger(__name__)

HOLD_REQUEST_SECONDS = 8.0
"""The desk joins the room and (the first time for a message) synthesises it."""
FINISH_EXTRA_SECONDS = 20.0
"""On top of the message's own length (at most ~40 s for 500 characters)."""
DESK_IDENTITY_PREFIX = "voicefleet-desk-"


def desk_token(
    api_key: str, api_secret: str, room: str, agent_name: str, valid_seconds: float
) -> str:
    """An agent participant's token for `room` alone (kind agent: livekit-sip answers a call once
    an agent publishes audio, and the fleet's agent does not take the desk for its caller)."""
    return (
        livekit_api.AccessToken(api_key, api_secret)
        .with_identity(f"{DESK_IDENTITY_PREFIX}{room}"[:128])
        .with_name("VoiceFleet")
        .with_kind("agent")
        .with_attributes({DESK_ATTRIBUTE: "holding", FLEET_ATTRIBUTE: agent_name})
        .with_ttl(timedelta(seconds=valid_seconds))
        .with_grants(
            livekit_api.VideoGrants(
                room_join=True,
                room=room,
                agent=True,
                can_publish=True,
                can_subscribe=False,
                can_publish_data=False,
                can_update_own_metadata=True,
            )
        )
        .to_jwt()
    )


class DeskClient:
    """Requests to the desk; every failure is logged and reported as False/None (the caller then
    gets what the operator gives without a desk: ringing, then 486 or the attribute)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def hold(
        self,
        credentials: tuple[str, str, str],
        room: str,
        agent_name: str,
        message: str | None,
        max_seconds: float,
    ) -> bool:
        """Ask the desk to join `room` and say `message` (None: join silently, to be finished
        with the overflow message)."""
        _, key, secret = credentials
        request = HoldRequest(
            room=room,
            token=desk_token(key, secret, room, agent_name, max_seconds + 60),
            agent_name=agent_name,
            message=message,
            max_seconds=max_seconds,
        )
        answer = await self._send("POST", "/holds", request, HOLD_REQUEST_SECONDS)
        return answer is not None

    async def finish(self, room: str, message: str, reason: str) -> Finished | None:
        body = FinishRequest(message=message, reason=reason)
        # The message is at most 500 characters: well under a minute of speech.
        answer = await self._send(
            "POST", f"/holds/{quote(room, safe='')}/finish", body, 60.0 + FINISH_EXTRA_SECONDS
        )
        if answer is None:
            return None
        try:
            return Finished.model_validate(answer)
        except ValidationError as error:
            log.warning("the desk's answer to finish room %s: %s", room, error)
            return None

    async def end(self, room: str) -> bool:
        path = f"/holds/{quote(room, safe='')}"
        return await self._send("DELETE", path, None, HOLD_REQUEST_SECONDS) is not None

    async def _send(
        self,
        method: str,
        path: str,
        body: HoldRequest | FinishRequest | None,
        timeout_s: float,
    ) -> dict[str, object] | None:
        data = None if body is None else body.model_dump_json(by_alias=True)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
                session.request(
                    method,
                    self.url + path,
                    data=data,
                    headers={"Content-Type": "application/json"},
                ) as response,
            ):
                if response.status == 204:
                    return {}
                answer = await response.json(content_type=None)
                if response.status >= 300:
                    log.warning(
                        "the desk refused %s %s: %s %s", method, path, response.status, answer
                    )
                    return None
                return dict(answer)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning("the desk at %s did not answer %s %s: %r", self.url, method, path, error)
            return None
