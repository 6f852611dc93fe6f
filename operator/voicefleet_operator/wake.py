"""Waking a fleet scaled to zero: the operator holds the caller while the first worker starts.

With `scaling.minReplicas: 0` an idle fleet has no worker, and livekit-server drops a dispatch
for an agent name no worker has registered, for good (standby.py says where). The same happens
to any fleet whose workers are all gone for a while (pods unschedulable, crash-looping or
restarting). So the operator's leader keeps a standby worker (standby.py) registered under the
dispatch name of every valid VoiceAgent (not one pinned to zero replicas), from the autoscaler's
first evaluation of it on (before that the operator does not know whether workers are
registered). On an offer:

- while a worker of the fleet is registered, the standby refuses (livekit-server offers the job
  to the fleet's workers at once);
- otherwise it takes the job (ends it without an agent, so nothing joins the room), notes the
  caller as waiting (`OperatorContext.wake`) and nudges the autoscaler, which counts waiting
  callers as calls (handlers.autoscale -> autoscaler.evaluate): the Deployment goes to one
  replica at once. A phone caller keeps hearing ringing (livekit-sip answers only when an agent
  publishes audio), a WebRTC caller waits in its room;
- as soon as the autoscaler sees a worker registered (Ready, or answering GET /ready while
  callers wait), the call is handed over: `CreateDispatch` for the caller's room with the
  fleet's dispatch name, which livekit-server offers to the new worker (the standby, offered
  it too, refuses). The worker's admission then answers the caller or gives spec.overflow;
- after `VOICEFLEET_WAKE_TIMEOUT_SECONDS` (default 25, below the SIP trunks' 30 s ringing
  timeout) without a worker, the treatment the operator can give without one: a phone call is
  ended (livekit-sip sends 486 Busy Here when its participant is removed), a WebRTC caller gets
  the participant attribute `voicefleet.overflow=wake_timeout`; a Warning Event says so;
- sooner when no wake can happen: when the autoscaler sees no worker registered and every
  worker pod unschedulable (CapacityLimited=PodsUnschedulable, each pod's PodScheduled=False/
  Unschedulable: capacity.no_worker_can_start, from the pods the evaluation reads anyway), held
  callers and callers arriving meanwhile get that treatment at once, with
  `voicefleet.overflow=pods_unschedulable` and a `WakeImpossible` Warning Event.

Only the leader runs kopf daemons, so one operator replica registers the standbys. A caller
held by a leader that dies is not handed over (the new leader does not know the room); its
phone call ends at the trunk's ringing timeout. Not built: a spoken holding message (the
operator has no TTS; a phone caller hears ringing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from livekit import api as livekit_api
from livekit.protocol import agent, models

from voicefleet_operator import metrics
from voicefleet_operator.api import GROUP, PLURAL, VERSION, SpecError, parse_spec
from voicefleet_operator.context import OperatorContext, WakeState
from voicefleet_operator.render import dispatch_name
from voicefleet_operator.reporting import post_event
from voicefleet_operator.standby import Answer, StandbyWorker

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
"""How often the daemon re-reads the VoiceAgent (starts or stops its standby)."""
WAKE_TIMEOUT_REASON = "wake_timeout"
UNSCHEDULABLE_REASON = "pods_unschedulable"
"""No worker registered and every worker pod is unschedulable: told at once, no wake timeout."""
OVERFLOW_ATTRIBUTE = "voicefleet.overflow"
"""The runtime's overflow attribute (voicefleet_runtime.admission.OVERFLOW_ATTRIBUTE)."""


def wants_standby(body: Mapping[str, Any]) -> bool:
    """A standby for every valid VoiceAgent that is not being deleted or pinned to zero
    replicas (an invalid spec keeps whatever runs: no standby). While the fleet's workers are
    registered the standby refuses every offer, so it changes nothing then."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        return False
    return spec.scaling.replicas != 0


class FleetStandby:
    """The standby of one VoiceAgent and the callers it holds."""

    def __init__(
        self,
        ctx: OperatorContext,
        body: Mapping[str, Any],
        credentials: tuple[str, str, str],
    ) -> None:
        metadata = body["metadata"]
        self.ctx = ctx
        self.body = body
        self.namespace = str(metadata["namespace"])
        self.name = str(metadata["name"])
        self.agent_name = dispatch_name(self.namespace, self.name)
        self.credentials = credentials
        self.state: WakeState = ctx.wake(self.namespace, self.name)
        self.handovers: set[str] = set()
        """Dispatch IDs the standby created for handovers (it refuses their offers)."""
        self._holds: set[asyncio.Task[None]] = set()
        url, key, secret = credentials
        self.worker = StandbyWorker(url, key, secret, self.agent_name, self.decide)
        self._task: asyncio.Task[None] | None = None

    @property
    def holding(self) -> bool:
        return bool(self._holds)

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(), name=f"standby {self.agent_name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._holds) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.state.waiting.clear()

    # --- offers ---------------------------------------------------------------------------

    def decide(self, job: agent.Job) -> Answer:
        if job.dispatch_id in self.handovers or self.state.registered_workers > 0:
            return Answer.REFUSE
        room = job.room.name
        if room in self.state.waiting:
            return Answer.TAKE  # a second dispatch of a room already held: one handover
        self.state.waiting[room] = time.monotonic()
        self.state.nudge.set()
        if self.state.no_worker_can_start:
            log.info(
                "%s/%s: no worker registered and %s; turning the caller of room %s away",
                self.namespace,
                self.name,
                self.state.no_worker_can_start,
                room,
            )
        else:
            log.info(
                "%s/%s: no worker registered; holding the caller of room %s while the fleet wakes",
                self.namespace,
                self.name,
                room,
            )
        task = asyncio.create_task(self._hold(job), name=f"wake {self.agent_name} {room}")
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)
        return Answer.TAKE

    # --- one held caller -------------------------------------------------------------------

    async def _hold(self, job: agent.Job) -> None:
        room = job.room.name
        taken = self.state.waiting.get(room, time.monotonic())
        deadline = taken + self.ctx.settings.wake_timeout_seconds
        labels = (self.namespace, self.name)
        try:
            await self._wait(deadline - time.monotonic())
            async with livekit_api.LiveKitAPI(*self.credentials, failover=False) as lkapi:
                callers = await _callers(lkapi, room)
                if not callers:
                    log.info("%s/%s: room %s: the caller left", *labels, room)
                    metrics.WAKES.labels(*labels, "caller_left").inc()
                elif self.state.registered_workers == 0 and self.state.no_worker_can_start:
                    # No wake can happen: the treatment now, not after the wake timeout.
                    why = self.state.no_worker_can_start
                    await _treat(lkapi, room, callers, UNSCHEDULABLE_REASON)
                    metrics.WAKES.labels(*labels, "unschedulable").inc()
                    message = (
                        f"no worker registered and {why}: the caller of room {room} was turned "
                        f"away at once (phone: 486 Busy Here; WebRTC: attribute "
                        f"{OVERFLOW_ATTRIBUTE}={UNSCHEDULABLE_REASON}). See the CapacityLimited "
                        "condition"
                    )
                    log.warning("%s/%s: %s", *labels, message)
                    post_event(self.body, "Warning", "WakeImpossible", message)
                elif self.state.registered_workers > 0:
                    await self._hand_over(lkapi, job)
                    waited = time.monotonic() - taken
                    metrics.WAKES.labels(*labels, "handed_over").inc()
                    metrics.WAKE_SECONDS.labels(*labels).observe(waited)
                    log.info(
                        "%s/%s: room %s handed over to the fleet's first worker %.1fs after "
                        "the offer",
                        *labels,
                        room,
                        waited,
                    )
                else:
                    await _treat(lkapi, room, callers, WAKE_TIMEOUT_REASON)
                    metrics.WAKES.labels(*labels, "timed_out").inc()
                    message = (
                        f"no worker registered within {self.ctx.settings.wake_timeout_seconds:g}s "
                        f"of a call (room {room}); the caller was turned away (phone: 486 Busy "
                        f"Here; WebRTC: attribute {OVERFLOW_ATTRIBUTE}={WAKE_TIMEOUT_REASON}). "
                        "See the CapacityLimited and WorkersAvailable conditions"
                    )
                    log.warning("%s/%s: %s", *labels, message)
                    post_event(self.body, "Warning", "WakeTimedOut", message)
        except (aiohttp.ClientError, livekit_api.TwirpError, TimeoutError) as error:
            log.warning("%s/%s: room %s: waking failed: %s", *labels, room, error)
        finally:
            self.state.waiting.pop(room, None)

    async def _wait(self, remaining: float) -> None:
        """Until a worker registers, no worker can start (every pod unschedulable), or
        `remaining` seconds have passed."""
        if remaining <= 0:
            return
        waits = [
            asyncio.create_task(self.state.worker_registered.wait()),
            asyncio.create_task(self.state.blocked.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _hand_over(self, lkapi: livekit_api.LiveKitAPI, job: agent.Job) -> None:
        request = livekit_api.CreateAgentDispatchRequest(
            agent_name=self.agent_name, room=job.room.name, metadata=job.metadata
        )
        if job.attributes:
            request.attributes.update(dict(job.attributes))
        dispatch = await lkapi.agent_dispatch.create_dispatch(request)
        self.handovers.add(dispatch.id)


async def _callers(lkapi: livekit_api.LiveKitAPI, room: str) -> list[models.ParticipantInfo]:
    """The room's participants that are not agents (empty when the room is gone)."""
    try:
        listed = await lkapi.room.list_participants(livekit_api.ListParticipantsRequest(room=room))
    except livekit_api.TwirpError as error:
        if error.code == livekit_api.TwirpErrorCode.NOT_FOUND:
            return []
        raise
    return [p for p in listed.participants if p.kind != models.ParticipantInfo.Kind.AGENT]


async def _treat(
    lkapi: livekit_api.LiveKitAPI,
    room: str,
    callers: list[models.ParticipantInfo],
    reason: str,
) -> None:
    """The treatment without a worker: end phone calls (livekit-sip: 486 before the answer),
    tell WebRTC callers through their own attributes (`voicefleet.overflow=<reason>`)."""
    for caller in callers:
        if caller.kind == models.ParticipantInfo.Kind.SIP:
            await lkapi.room.remove_participant(
                livekit_api.RoomParticipantIdentity(room=room, identity=caller.identity)
            )
        else:
            await lkapi.room.update_participant(
                livekit_api.UpdateParticipantRequest(
                    room=room,
                    identity=caller.identity,
                    attributes={OVERFLOW_ATTRIBUTE: reason},
                )
            )


# --- kopf wiring -----------------------------------------------------------------------------


async def keep_standby(ctx: OperatorContext, namespace: str, name: str, stopped: Any) -> None:
    """The daemon's loop: a standby registered while the VoiceAgent wants one, from the
    autoscaler's first evaluation on."""
    fleet: FleetStandby | None = None
    try:
        while not stopped:
            try:
                body = await ctx.kube.get("VoiceAgent", namespace, name)
                evaluated = ctx.wake(namespace, name).evaluated
                wanted = body is not None and evaluated and wants_standby(body)
                credentials = await ctx.livekit_credentials() if wanted else None
                if fleet is not None and (credentials != fleet.credentials or not wanted):
                    if not fleet.holding or not wanted:
                        await fleet.stop()
                        fleet = None
                if body is not None and wanted and credentials is not None and fleet is None:
                    fleet = FleetStandby(ctx, body, credentials)
                    fleet.start()
                    log.info("%s/%s: standby registering as %s", namespace, name, fleet.agent_name)
                elif fleet is not None and body is not None:
                    fleet.body = body
            except Exception:  # keep the standby loop alive through API hiccups
                log.exception("%s/%s: standby check failed", namespace, name)
            await stopped.wait(CHECK_SECONDS)
    finally:
        if fleet is not None:
            await fleet.stop()
        ctx.forget_wake(namespace, name)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the standby daemon on `registry`, bound to `ctx` (called by __main__.build)."""

    @kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10, registry=registry)
    async def standby_voiceagent(
        *, name: str, namespace: str | None, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await keep_standby(ctx, str(namespace), name, stopped)
