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
  replica at once. With spec.overflow.holdMessage the desk joins and says it (a phone call is
  answered by it); otherwise a phone caller keeps hearing ringing (livekit-sip answers only
  when an agent publishes audio), a WebRTC caller waits in its room;
- as soon as the autoscaler sees a worker registered (Ready, or answering GET /ready while
  callers wait), the call is handed over: `CreateDispatch` for the caller's room with the
  fleet's dispatch name, which livekit-server offers to the new worker (the standby, offered
  it too, refuses). The worker's admission then answers the caller or gives spec.overflow;
- after `VOICEFLEET_WAKE_TIMEOUT_SECONDS` (default 25, below the SIP trunks' 30 s ringing
  timeout) without a worker, the treatment the operator can give without one: the desk says
  spec.overflow.message (to WebRTC callers; to phone callers it answered, or with sip.action
  message or transfer), then the call is hung up or transferred; a ringing phone call with
  sip.action reject is ended (livekit-sip sends 486 Busy Here when its participant is
  removed); a WebRTC caller gets the participant attribute `voicefleet.overflow=wake_timeout`;
  a Warning Event says so;
- sooner when no wake can happen: when the autoscaler sees no worker registered and every
  worker pod unschedulable (CapacityLimited=PodsUnschedulable, each pod's PodScheduled=False/
  Unschedulable: capacity.no_worker_can_start, from the pods the evaluation reads anyway) for
  UNSCHEDULABLE_CONFIRM_SECONDS (3 s: a scheduler's verdict can be short-lived), held callers
  and callers arriving meanwhile get that treatment at once, with
  `voicefleet.overflow=pods_unschedulable` and a `WakeImpossible` Warning Event.

Only the leader runs kopf daemons, so one operator replica registers the standbys. A held
caller lives in that leader's memory; livekit-server keeps nothing for it (the job ended when
the standby took it, and a worker's disconnection touches only jobs still running,
pkg/service/agentservice.go deregisterWorker), and a call dispatched while no standby is
registered (between a leader's death and the next one's standbys) is dropped. So whenever a
standby registers, its fleet is swept (OrphanSweep: one ListRooms, then ListDispatch per
occupied room, shared by the standbys registering together): a room with a caller, no agent,
and dispatches to the fleet that a standby took or that were dropped is held again
(`adopt`), its wait counted from the take or the dispatch, and woken or turned away as above.

A voice while no worker exists: the standby cannot publish audio (no WebRTC), so the platform
desk (desk.py; runtime desk.py) says spec.overflow.holdMessage to a held caller (answering a
phone call) and spec.overflow.message when no worker comes; the operator then hangs up or
transfers the answered call (livekit-sip v1.8.0 REFERs only answered calls, pkg/sip/inbound.go
newReferReq). Without a desk (or when it does not answer) a phone caller hears ringing, then
486; a WebRTC caller gets the attribute only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
from livekit import api as livekit_api
from livekit.protocol import agent, agent_dispatch, models
from voicefleet_runtime.admission import OVERFLOW_ATTRIBUTE, transfer_uri
from voicefleet_runtime.desk_contract import DESK_ATTRIBUTE

from voicefleet_operator import metrics
from voicefleet_operator.api import (
    GROUP,
    PLURAL,
    VERSION,
    OverflowOptions,
    SpecError,
    parse_spec,
)
from voicefleet_operator.context import OperatorContext, WakeState
from voicefleet_operator.desk import DeskClient
from voicefleet_operator.render import dispatch_name
from voicefleet_operator.reporting import post_event
from voicefleet_operator.standby import Answer, StandbyWorker

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
"""How often the daemon looks at its VoiceAgent (kopf's live body) and the autoscaler's
verdict, and starts or stops its standby."""
WAKE_TIMEOUT_REASON = "wake_timeout"
UNSCHEDULABLE_REASON = "pods_unschedulable"
"""No worker registered and every worker pod is unschedulable: told at once, no wake timeout."""
DESK_HANDOVER_SECONDS = 30.0
"""The desk stays this long past the wake timeout: a handed-over call's agent joins within it
(the desk leaves the moment it does)."""


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
        self.worker = StandbyWorker(
            url, key, secret, self.agent_name, self.decide, on_registered=self._registered
        )
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        desk_url = ctx.settings.desk_url
        self.desk = DeskClient(desk_url) if desk_url else None

    @property
    def holding(self) -> bool:
        return bool(self._holds)

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(), name=f"standby {self.agent_name}")

    async def stop(self) -> None:
        self._stopped = True
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

    def _registered(self) -> None:
        """Registered (again): look for callers no operator holds (OrphanSweep)."""
        sweep = getattr(self.ctx, "orphan_sweep", None)
        if not isinstance(sweep, OrphanSweep):
            sweep = OrphanSweep()
            self.ctx.orphan_sweep = sweep
        sweep.request(self)

    def adopt(self, orphan: Orphan) -> None:
        """Hold a caller found by the sweep as if the standby had taken its job: it has waited
        since `orphan.since`, which counts against the wake timeout."""
        room = orphan.room
        if self._stopped or room in self.state.waiting:
            return
        waited = max(0.0, time.time() - orphan.since)
        self.state.waiting[room] = time.monotonic() - waited
        self.state.nudge.set()
        log.info(
            "%s/%s: room %s: a caller no operator holds (its holder died, or it was dispatched "
            "while no standby was registered), waiting for %.1fs; holding it while the fleet "
            "wakes",
            self.namespace,
            self.name,
            room,
            waited,
        )
        job = agent.Job(agent_name=self.agent_name, metadata=orphan.metadata)
        job.room.name = room
        job.attributes.update(orphan.attributes)
        task = asyncio.create_task(self._hold(job), name=f"wake {self.agent_name} {room}")
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)

    # --- one held caller -------------------------------------------------------------------

    async def _hold(self, job: agent.Job) -> None:
        room = job.room.name
        taken = self.state.waiting.get(room, time.monotonic())
        deadline = taken + self.ctx.settings.wake_timeout_seconds
        labels = (self.namespace, self.name)
        overflow = self._overflow()
        desk_holds = False
        try:
            if (
                self.desk is not None
                and overflow.hold_message
                and not self.state.no_worker_can_start  # turned away at once: no hold
            ):
                desk_holds = await self.desk.hold(
                    self.credentials,
                    room,
                    self.agent_name,
                    overflow.hold_message,
                    max(1.0, deadline - time.monotonic()) + DESK_HANDOVER_SECONDS,
                )
                if desk_holds:
                    log.info("%s/%s: room %s: the desk says the holding message", *labels, room)
            await self._wait(deadline - time.monotonic())
            async with livekit_api.LiveKitAPI(*self.credentials, failover=False) as lkapi:
                callers = await _callers(lkapi, room)
                if not callers:
                    log.info("%s/%s: room %s: the caller left", *labels, room)
                    metrics.WAKES.labels(*labels, "caller_left").inc()
                    if desk_holds and self.desk is not None:
                        await self.desk.end(room)
                elif self.state.registered_workers == 0 and self.state.no_worker_can_start:
                    # No wake can happen: the treatment now, not after the wake timeout.
                    await self._turn_away(
                        lkapi, room, callers, desk_holds, UNSCHEDULABLE_REASON, "unschedulable",
                        "WakeImpossible",
                        f"no worker registered and {self.state.no_worker_can_start}: the caller "
                        f"of room {room} was turned away at once",
                        "See the CapacityLimited condition",
                    )  # fmt: skip
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
                    await self._turn_away(
                        lkapi, room, callers, desk_holds, WAKE_TIMEOUT_REASON, "timed_out",
                        "WakeTimedOut",
                        f"no worker registered within {self.ctx.settings.wake_timeout_seconds:g}s "
                        f"of a call (room {room}); the caller was turned away",
                        "See the CapacityLimited and WorkersAvailable conditions",
                    )  # fmt: skip
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

    async def _turn_away(
        self,
        lkapi: livekit_api.LiveKitAPI,
        room: str,
        callers: list[models.ParticipantInfo],
        desk_holds: bool,
        reason: str,
        result: str,
        event_reason: str,
        situation: str,
        see: str,
    ) -> None:
        """The no-worker treatment for the room's callers, counted, logged and posted: by the
        desk when it holds the caller (the call is answered: the overflow message, then a hang
        up or a transfer), else ending a ringing phone call (486) or the WebRTC attribute."""
        overflow = self._overflow()
        if not desk_holds and self.desk is not None and desk_speaks(callers, overflow):
            # The desk answers the call now, to say the message (no holding message).
            desk_holds = await self.desk.hold(
                self.credentials, room, self.agent_name, None, DESK_HANDOVER_SECONDS
            )
        if desk_holds and self.desk is not None:
            await _tell_webrtc_callers(lkapi, room, callers, reason)
            if await self.desk.finish(room, overflow.message, reason) is None:
                log.warning(
                    "%s/%s: room %s: the desk did not say the overflow message; ending the call",
                    self.namespace,
                    self.name,
                    room,
                )
            transfer = overflow.sip.transfer_to if overflow.sip.action == "transfer" else None
            await _end_phone_calls(lkapi, room, callers, transfer)
        else:
            await _treat(lkapi, room, callers, reason)
        message = f"{situation} ({_told(desk_holds, overflow, reason)}). {see}"
        metrics.WAKES.labels(self.namespace, self.name, result).inc()
        log.warning("%s/%s: %s", self.namespace, self.name, message)
        post_event(self.body, "Warning", event_reason, message)

    def _overflow(self) -> OverflowOptions:
        """The VoiceAgent's spec.overflow as it is now (defaults if the spec does not parse:
        a standby runs only for valid specs, so that is a spec changed a moment ago)."""
        try:
            return parse_spec(self.body.get("spec") or {}).overflow
        except SpecError:
            return OverflowOptions()

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


def desk_speaks(callers: Iterable[models.ParticipantInfo], overflow: OverflowOptions) -> bool:
    """Whether turning these callers away takes the desk's voice: a WebRTC caller hears
    spec.overflow.message; a phone caller does with sip.action message or transfer (reject
    ends the ringing call with a SIP status, no answer)."""
    return any(
        caller.kind != models.ParticipantInfo.Kind.SIP or overflow.sip.action != "reject"
        for caller in callers
    )


def _told(desk_holds: bool, overflow: OverflowOptions, reason: str) -> str:
    """How the caller was told, for the log and the Event."""
    if desk_holds:
        phone = "transferred" if overflow.sip.action == "transfer" else "hung up"
        return (
            f"the desk said spec.overflow.message; phone: then {phone}; WebRTC: attribute "
            f"{OVERFLOW_ATTRIBUTE}={reason}"
        )
    return f"phone: 486 Busy Here; WebRTC: attribute {OVERFLOW_ATTRIBUTE}={reason}"


async def _tell_webrtc_callers(
    lkapi: livekit_api.LiveKitAPI, room: str, callers: list[models.ParticipantInfo], reason: str
) -> None:
    for caller in callers:
        if caller.kind != models.ParticipantInfo.Kind.SIP:
            await lkapi.room.update_participant(
                livekit_api.UpdateParticipantRequest(
                    room=room, identity=caller.identity, attributes={OVERFLOW_ATTRIBUTE: reason}
                )
            )


async def _end_phone_calls(
    lkapi: livekit_api.LiveKitAPI,
    room: str,
    callers: list[models.ParticipantInfo],
    transfer_to: str | None = None,
) -> None:
    """End the room's phone calls: livekit-sip answers its participant's removal with 486 for a
    ringing call and a BYE for an answered one. With `transfer_to`, an answered call is
    transferred instead (a SIP REFER, which livekit-sip sends only for an answered call); a
    transfer that fails ends the call. A caller gone meanwhile is no error."""
    for caller in callers:
        if caller.kind != models.ParticipantInfo.Kind.SIP:
            continue
        if transfer_to:
            try:
                await lkapi.sip.transfer_sip_participant(
                    livekit_api.TransferSIPParticipantRequest(
                        room_name=room,
                        participant_identity=caller.identity,
                        transfer_to=transfer_uri(transfer_to),
                        play_dialtone=False,
                    )
                )
                continue
            except livekit_api.TwirpError as error:
                log.warning("room %s: the overflow transfer failed (%s); hanging up", room, error)
        try:
            await lkapi.room.remove_participant(
                livekit_api.RoomParticipantIdentity(room=room, identity=caller.identity)
            )
        except livekit_api.TwirpError as error:
            if error.code != livekit_api.TwirpErrorCode.NOT_FOUND:
                raise


async def _treat(
    lkapi: livekit_api.LiveKitAPI,
    room: str,
    callers: list[models.ParticipantInfo],
    reason: str,
) -> None:
    """The treatment without a worker: end phone calls (livekit-sip: 486 before the answer),
    tell WebRTC callers through their own attributes (`voicefleet.overflow=<reason>`)."""
    await _end_phone_calls(lkapi, room, callers)
    await _tell_webrtc_callers(lkapi, room, callers, reason)


# --- callers no operator holds -------------------------------------------------------------

ORPHAN_MIN_AGE_SECONDS = 12.0
"""A dispatch with no job yet is an orphan only this long after it was created: livekit-server
answers or abandons an offer within its AssignJobTimeout (10 s, pkg/agent/worker.go), so a
younger one may still be on its way to a worker (adopting it could bring a second agent)."""
SWEEP_DELAY_SECONDS = 1.0
"""Standbys registering within this long share one sweep (after a takeover: all of them)."""
SWEEP_INTERVAL_SECONDS = 5.0
"""At least this long between two sweeps' starts (a takeover of many VoiceAgents, whose
standbys register over a while, costs a sweep every few seconds, not one per standby)."""
SWEEP_CONCURRENCY = 16


@dataclass(frozen=True)
class Orphan:
    """A room whose caller waits for a fleet no worker or operator serves."""

    room: str
    agent_name: str
    metadata: str
    attributes: dict[str, str]
    since: float
    """Wall-clock time the caller has waited from (the standby's take, or the dispatch)."""


def orphan_of(
    room: str,
    dispatches: Iterable[agent_dispatch.AgentDispatch],
    participants: Iterable[models.ParticipantInfo],
    agent_names: Collection[str],
    now: float,
) -> Orphan | None:
    """The room's caller if no one serves it (pure; `now` in wall-clock seconds).

    livekit-server records each dispatch's jobs as launched (pkg/rtc/room.go handleNewJobs):
    a job a worker accepted carries the agent's participant identity; one the standby took has
    none (it ended at once, `terminate`); a dispatch made while no worker of its name was
    registered has no job at all (dropped, pkg/agent/client.go). Nothing retries either. So a
    room is an orphan when it holds a caller and no agent, and its dispatches to one of
    `agent_names` were all taken by a standby or dropped (none younger than
    ORPHAN_MIN_AGE_SECONDS without a job: that one may still reach a worker). A caller told
    already (the `voicefleet.overflow` attribute) is not waiting. The desk (attribute
    `voicefleet.desk`) is neither an agent nor a caller here."""
    ours = [d for d in dispatches if d.agent_name in agent_names]
    if not ours:
        return None
    # The platform desk holding the caller is no agent of the fleet: a dead leader's desk hold
    # is an orphan too (the next leader holds it again and wakes the fleet).
    people = [p for p in participants if DESK_ATTRIBUTE not in p.attributes]
    if any(p.kind == models.ParticipantInfo.Kind.AGENT for p in people):
        return None
    if not any(OVERFLOW_ATTRIBUTE not in p.attributes for p in people):
        return None  # no caller, or every caller was already told (wake timeout, overflow)
    since = now
    for dispatch in ours:
        jobs = list(dispatch.state.jobs)
        if any(job.state.participant_identity for job in jobs):
            return None  # an agent was assigned (it may have left: the call is not waiting)
        created = dispatch.state.created_at / 1e9
        if not jobs and now - created < ORPHAN_MIN_AGE_SECONDS:
            return None
        ended = [job.state.ended_at / 1e9 for job in jobs if job.state.ended_at]
        since = min(since, min(ended) if ended else created)
    first = ours[0]
    return Orphan(room, first.agent_name, first.metadata, dict(first.attributes), since)


def too_young(
    dispatches: Iterable[agent_dispatch.AgentDispatch], agent_names: Collection[str], now: float
) -> set[str]:
    """The fleets of `agent_names` with a dispatch here that has no job yet and is younger than
    ORPHAN_MIN_AGE_SECONDS: not an orphan yet, maybe one later (look again then)."""
    return {
        d.agent_name
        for d in dispatches
        if d.agent_name in agent_names
        and not d.state.jobs
        and now - d.state.created_at / 1e9 < ORPHAN_MIN_AGE_SECONDS
    }


async def find_orphans(
    credentials: tuple[str, str, str], agent_names: Collection[str]
) -> tuple[list[Orphan], set[str]]:
    """One pass over the LiveKit server's rooms: ListRooms, then each room with participants
    has its dispatches listed, and its participants when a dispatch names one of
    `agent_names` (at most SWEEP_CONCURRENCY requests at once). Also the fleets to look at
    again (`too_young`)."""
    limit = asyncio.Semaphore(SWEEP_CONCURRENCY)
    async with livekit_api.LiveKitAPI(*credentials, failover=False) as lkapi:
        rooms = await lkapi.room.list_rooms(livekit_api.ListRoomsRequest())

        again: set[str] = set()

        async def check(room: str) -> Orphan | None:
            async with limit:
                try:
                    dispatches = await lkapi.agent_dispatch.list_dispatch(room)
                    if not any(d.agent_name in agent_names for d in dispatches):
                        return None
                    listed = await lkapi.room.list_participants(
                        livekit_api.ListParticipantsRequest(room=room)
                    )
                except livekit_api.TwirpError as error:
                    if error.code == livekit_api.TwirpErrorCode.NOT_FOUND:
                        return None  # the room ended meanwhile
                    raise
            now = time.time()
            found = orphan_of(room, dispatches, listed.participants, agent_names, now)
            if found is None:
                again.update(too_young(dispatches, agent_names, now))
            return found

        found = await asyncio.gather(
            *(check(r.name) for r in rooms.rooms if r.num_participants > 0)
        )
    return [orphan for orphan in found if orphan is not None], again


class OrphanSweep:
    """Finds callers no operator holds and gives them to their fleet's standby (`adopt`).

    A held caller lives in the memory of the leader that took its job; when that leader dies,
    livekit-server does nothing more for it (the job ended when the standby took it), and a
    call dispatched while no standby was registered (between the old leader's death and the new
    one's registration) was dropped. So each time a standby registers, its fleet is swept for
    such rooms; standbys registering together (the new leader's, after a takeover) share one
    sweep, so a takeover costs one ListRooms plus a ListDispatch per occupied room."""

    def __init__(self) -> None:
        self._wanted: dict[str, FleetStandby] = {}
        self._task: asyncio.Task[None] | None = None
        self._started_at = -SWEEP_INTERVAL_SECONDS

    def request(self, fleet: FleetStandby) -> None:
        self._wanted[fleet.agent_name] = fleet
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="orphan sweep")

    async def _run(self) -> None:
        while self._wanted:
            since = time.monotonic() - self._started_at
            await asyncio.sleep(max(SWEEP_DELAY_SECONDS, SWEEP_INTERVAL_SECONDS - since))
            self._started_at = time.monotonic()
            wanted, self._wanted = self._wanted, {}
            groups: dict[tuple[str, str, str], dict[str, FleetStandby]] = {}
            for agent_name, fleet in wanted.items():
                groups.setdefault(fleet.credentials, {})[agent_name] = fleet
            for credentials, fleets in groups.items():
                try:
                    orphans, again = await find_orphans(credentials, fleets.keys())
                except (aiohttp.ClientError, livekit_api.TwirpError, TimeoutError) as error:
                    log.warning("looking for callers no operator holds failed: %s", error)
                    for agent_name, fleet in fleets.items():
                        self._wanted.setdefault(agent_name, fleet)  # again, after the interval
                    continue
                log.info(
                    "looked for callers no operator holds for %d fleet(s): %d found",
                    len(fleets),
                    len(orphans),
                )
                for orphan in orphans:
                    fleets[orphan.agent_name].adopt(orphan)
                for agent_name in again:  # a dispatch too young to judge: after the interval
                    self._wanted.setdefault(agent_name, fleets[agent_name])


# --- kopf wiring -----------------------------------------------------------------------------


async def keep_standby(ctx: OperatorContext, live_body: Mapping[str, Any], stopped: Any) -> None:
    """The daemon's loop: a standby registered while the VoiceAgent wants one, from the
    autoscaler's first evaluation on.

    `live_body` is kopf's live view of the VoiceAgent (kopf swaps its contents on every watch
    event), so the loop costs no API request: reading the VoiceAgent every CHECK_SECONDS was
    500 GETs a second at 1000 VoiceAgents. The spec is parsed again only when its generation
    (or deletion) changes."""
    metadata = live_body["metadata"]
    namespace, name = str(metadata["namespace"]), str(metadata["name"])
    fleet: FleetStandby | None = None
    judged: tuple[tuple[Any, bool], bool] | None = None  # ((generation, deleting), wanted)
    try:
        while not stopped:
            try:
                body = dict(live_body)  # this version, whatever the next event brings
                meta = body["metadata"]
                version = (meta.get("generation"), bool(meta.get("deletionTimestamp")))
                if judged is None or judged[0] != version:
                    judged = (version, wants_standby(body))
                wanted = judged[1] and ctx.wake(namespace, name).evaluated
                credentials = await ctx.livekit_credentials() if wanted else None
                if fleet is not None and (credentials != fleet.credentials or not wanted):
                    if not fleet.holding or not wanted:
                        await fleet.stop()
                        fleet = None
                if wanted and credentials is not None and fleet is None:
                    fleet = FleetStandby(ctx, body, credentials)
                    fleet.start()
                    log.info("%s/%s: standby registering as %s", namespace, name, fleet.agent_name)
                elif fleet is not None:
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
    async def standby_voiceagent(*, body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await keep_standby(ctx, body, stopped)
