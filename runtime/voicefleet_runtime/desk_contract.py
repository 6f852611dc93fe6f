"""The platform desk's HTTP contract: what the operator asks of the desk (desk.py). Part of the
config contract (pydantic, the standard library and config.py only), so the operator imports it
without livekit-agents.

The desk speaks to callers of a fleet that has no worker to do it: while a fleet at zero (or
one whose workers are all gone) starts its first worker, the caller hears
`spec.overflow.holdMessage`; when no worker comes in time, `spec.overflow.message`. It holds no
LiveKit credential: each request carries a token the operator minted for that one room.

    POST   /holds                {HoldRequest}   -> 201 HoldStarted (joined, track published)
    POST   /holds/{room}/finish  {FinishRequest} -> 200 Finished (spoken, then left the room)
    DELETE /holds/{room}                         -> 204 (left the room)
    GET    /healthz, GET /metrics
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from voicefleet_runtime.config import Model

DESK_ATTRIBUTE = "voicefleet.desk"
"""Participant attribute of the desk in a caller's room: `holding` while it holds the caller,
`overflow` while it gives the overflow message. A client can show it."""

FLEET_ATTRIBUTE = "voicefleet.fleet"
"""Participant attribute of the desk: the dispatch name of the fleet it holds the caller for."""

DEFAULT_DESK_PORT = 8095


class HoldRequest(Model):
    """Join `room` with `token` and say `message` to the caller (a phone call is answered by
    the desk's published track); stay (silent) until an agent of
    `agent_name` joins, every caller leaves, `max_seconds` pass, or the operator finishes or
    ends the hold."""

    room: Annotated[str, Field(min_length=1, max_length=256)]
    token: Annotated[str, Field(min_length=1)]
    """An agent token for `room` only, minted by the operator (the desk has no API key)."""
    agent_name: Annotated[str, Field(min_length=1, max_length=128)]
    """The fleet's dispatch name: the desk leaves when an agent with this `lk.agent_name`
    joins (the woken worker took the call)."""
    message: Annotated[str | None, Field(min_length=1, max_length=500)]
    """The holding message; None: join without a word (the overflow message follows at once,
    POST .../finish)."""
    max_seconds: Annotated[float, Field(gt=0, le=600)] = 60.0
    """The desk leaves by itself after this long, whatever the operator does."""


class HoldStarted(Model):
    room: str
    joined_seconds: float
    """From the request to the desk's audio track published in the room."""


class FinishRequest(Model):
    """Stop the holding message, say `message` (the overflow message) and leave."""

    message: Annotated[str, Field(min_length=1, max_length=500)]
    reason: Annotated[str, Field(min_length=1, max_length=64)]
    """Why (e.g. wake_timeout): the desk's `voicefleet.desk` attribute becomes `overflow` and
    this is logged and counted."""


class Finished(Model):
    room: str
    spoken_seconds: float
    """Audio said (0 when the caller had left)."""
