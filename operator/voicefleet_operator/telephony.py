"""Phone numbers for VoiceAgents: the LiveKit SIP inbound trunk and dispatch rule of each one.

The operator is the only writer of these LiveKit-side objects. Each VoiceAgent with numbers owns
at most one inbound trunk and one dispatch rule, both named `voicefleet:<namespace>/<name>`; that
name is how a restarted operator finds them again (never by a remembered ID), so it never
creates duplicates.

Who gets a number that two VoiceAgents list (the first claimant keeps it):
  1. A number already on a LiveKit trunk belongs to that trunk's owner. A VoiceAgent never takes
     a number from a trunk it does not own, VoiceFleet-managed or not.
  2. Among claims that no trunk holds yet, the VoiceAgent with the oldest creationTimestamp wins
     (ties, at the API server's one-second resolution, go to the smaller namespace/name). Every
     claimant computes the same answer from the cluster's VoiceAgents, so simultaneous claims
     never both win; and livekit-server itself refuses a second trunk for the same number, which
     covers a claimant the operator cannot see.
  A later claimant serves its other numbers and reports `NumberConflict` naming the number; when
  the holder lets go (deleted, or number removed) the periodic check hands the number over.

The pure functions (rendering, conflict resolution, condition text) are separate from
`TelephonyProvisioner`, which talks to livekit-server through livekit-api's SipService.
Credentials appear only in the trunk request itself: `SipAuth` hides its password from repr,
and nothing here logs or returns a trunk.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeVar

from google.protobuf.duration_pb2 import Duration
from livekit.protocol.agent_dispatch import RoomAgentDispatch
from livekit.protocol.room import RoomConfiguration
from livekit.protocol.sip import (
    CreateSIPDispatchRuleRequest,
    CreateSIPInboundTrunkRequest,
    DeleteSIPDispatchRuleRequest,
    DeleteSIPTrunkRequest,
    ListSIPDispatchRuleRequest,
    ListSIPInboundTrunkRequest,
    SIPDispatchRule,
    SIPDispatchRuleIndividual,
    SIPDispatchRuleInfo,
    SIPInboundTrunkInfo,
)

if TYPE_CHECKING:
    from livekit.api import LiveKitAPI

logger = logging.getLogger(__name__)

T = TypeVar("T")

MANAGED_BY = "voicefleet"
OBJECT_NAME_PREFIX = "voicefleet:"
"""LiveKit trunk and rule names are `voicefleet:<namespace>/<name>`."""

ATTR_VOICE_AGENT = "voicefleet.dev/voiceAgent"
"""Participant attribute (set by the dispatch rule) naming the VoiceAgent a call is for."""

RINGING_TIMEOUT_SECONDS = 30
"""The trunk's ringing_timeout: livekit-sip rings a call until an agent publishes audio in its
room, then answers; with no agent at all (no worker registered: a fleet at zero, every worker
restarting) it would ring for its default 3 minutes before 486. While workers run, a caller
beyond capacity gets spec.overflow in seconds instead (runtime admission); this bounds the
no-worker case (486 Busy Here after it), leaving room for a worker to start. A platform whose
wake timeout (settings.wake_timeout_seconds: a fleet scaled to zero waking for a call) is longer
rings longer: `ringing_timeout_for`."""

WAKE_MARGIN_SECONDS = 5
"""The trunk rings this much longer than the operator holds a waking fleet's caller, so that the
operator's treatment (or the handover) comes first."""


def ringing_timeout_for(wake_timeout_seconds: float) -> int:
    """The trunks' ringing timeout: RINGING_TIMEOUT_SECONDS, or longer than the wake timeout."""
    return max(RINGING_TIMEOUT_SECONDS, math.ceil(wake_timeout_seconds) + WAKE_MARGIN_SECONDS)


REASON_PROVISIONED = "Provisioned"
REASON_NO_NUMBERS = "NoNumbers"
REASON_NUMBER_CONFLICT = "NumberConflict"
REASON_LIVEKIT_ERROR = "LiveKitError"
REASON_SECRET_INVALID = "AuthSecretInvalid"

# Retry delays after a LiveKit API failure: 5 s doubling up to 5 minutes.
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


class TelephonyError(Exception):
    """LiveKit's SIP API failed; the message says which call and why (never a credential)."""


# --- identities -----------------------------------------------------------------------------


def owner_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def object_name(namespace: str, name: str) -> str:
    """Name of the VoiceAgent's trunk and dispatch rule in LiveKit."""
    return f"{OBJECT_NAME_PREFIX}{owner_key(namespace, name)}"


def owner_of(livekit_object_name: str) -> str | None:
    """`namespace/name` of the VoiceAgent owning a trunk or rule, None if not VoiceFleet's."""
    if not livekit_object_name.startswith(OBJECT_NAME_PREFIX):
        return None
    key = livekit_object_name[len(OBJECT_NAME_PREFIX) :]
    return key if key.count("/") == 1 else None


def room_prefix(namespace: str, name: str) -> str:
    """Prefix of the per-call rooms; LiveKit appends `_<caller>_<random>`.

    `_` cannot occur in namespaces or VoiceAgent names (DNS-1123), so the prefix is unambiguous.
    """
    return f"call_{namespace}_{name}"


def normalize_number(number: str) -> str:
    """The form livekit-server compares numbers in: `+` and digits, separators dropped."""
    digits = "".join(ch for ch in number if ch.isdigit())
    return f"+{digits}" if digits else number


# --- desired state --------------------------------------------------------------------------


@dataclass(frozen=True)
class SipAuth:
    """Digest credentials callers' SIP providers must present (from the tenant's Secret)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class TelephonyTarget:
    """What one VoiceAgent asks for: the input to rendering and provisioning."""

    namespace: str
    name: str
    created: str
    """The VoiceAgent's metadata.creationTimestamp (RFC 3339): orders competing claims."""
    dispatch_name: str
    """The agent name its workers register under; the dispatch rule dispatches it."""
    numbers: tuple[str, ...]
    allowed_addresses: tuple[str, ...] = ()
    auth: SipAuth | None = None
    ringing_timeout_seconds: int = RINGING_TIMEOUT_SECONDS
    """The inbound trunk's ringing_timeout (ringing_timeout_for the platform's wake timeout)."""

    @property
    def key(self) -> str:
        return owner_key(self.namespace, self.name)

    @property
    def claim(self) -> Claim:
        return Claim(self.namespace, self.name, self.created, self.numbers)


@dataclass(frozen=True)
class Claim:
    """A VoiceAgent's claim to numbers, as the cluster's VoiceAgents show it."""

    namespace: str
    name: str
    created: str
    numbers: tuple[str, ...]

    @property
    def key(self) -> str:
        return owner_key(self.namespace, self.name)

    @property
    def precedence(self) -> tuple[datetime, str, str]:
        """Smaller wins: older creationTimestamp, then namespace, then name."""
        return (_parse_time(self.created), self.namespace, self.name)


def _parse_time(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def call_metadata(target: TelephonyTarget) -> str:
    """JSON the dispatch rule gives each call: the SIP participant's metadata and the job's."""
    return json.dumps(
        {
            "managedBy": MANAGED_BY,
            "voiceAgent": target.key,
            "tenant": target.namespace,
            "dispatchName": target.dispatch_name,
            "source": "sip",
        },
        sort_keys=True,
    )


def _owner_metadata(target: TelephonyTarget) -> str:
    return json.dumps(
        {"managedBy": MANAGED_BY, "voiceAgent": target.key, "claimed": target.created},
        sort_keys=True,
    )


def render_inbound_trunk(
    target: TelephonyTarget, numbers: Sequence[str] | None = None
) -> SIPInboundTrunkInfo:
    """The inbound trunk for `numbers` (default: all of the target's), without an ID."""
    serving = list(target.numbers if numbers is None else numbers)
    if not serving:
        # A trunk without numbers matches every dialled number: never create one.
        raise ValueError(f"VoiceAgent {target.key}: an inbound trunk needs at least one number")
    trunk = SIPInboundTrunkInfo(
        name=object_name(target.namespace, target.name),
        metadata=_owner_metadata(target),
        numbers=serving,
        allowed_addresses=list(target.allowed_addresses),
        ringing_timeout=Duration(seconds=target.ringing_timeout_seconds),
    )
    if target.auth is not None:
        trunk.auth_username = target.auth.username
        trunk.auth_password = target.auth.password
    return trunk


def render_dispatch_rule(target: TelephonyTarget, trunk_id: str) -> SIPDispatchRuleInfo:
    """The dispatch rule: an individual room per call, the VoiceAgent's agent dispatched into it."""
    metadata = call_metadata(target)
    return SIPDispatchRuleInfo(
        name=object_name(target.namespace, target.name),
        trunk_ids=[trunk_id],
        rule=SIPDispatchRule(
            dispatch_rule_individual=SIPDispatchRuleIndividual(
                room_prefix=room_prefix(target.namespace, target.name)
            )
        ),
        metadata=metadata,
        attributes={ATTR_VOICE_AGENT: target.key},
        room_config=RoomConfiguration(
            agents=[RoomAgentDispatch(agent_name=target.dispatch_name, metadata=metadata)]
        ),
    )


def trunk_differs(existing: SIPInboundTrunkInfo, desired: SIPInboundTrunkInfo) -> bool:
    """True when `existing` must be updated to serve as `desired` (IDs and timestamps aside)."""
    return (
        existing.name != desired.name
        or existing.metadata != desired.metadata
        or list(existing.numbers) != list(desired.numbers)
        or list(existing.allowed_addresses) != list(desired.allowed_addresses)
        or list(existing.allowed_numbers) != list(desired.allowed_numbers)
        or existing.auth_username != desired.auth_username
        or existing.auth_password != desired.auth_password
        or existing.ringing_timeout.seconds != desired.ringing_timeout.seconds
    )


def rule_differs(existing: SIPDispatchRuleInfo, desired: SIPDispatchRuleInfo) -> bool:
    """True when `existing` must be updated to dispatch as `desired`."""
    return (
        existing.name != desired.name
        or existing.metadata != desired.metadata
        or list(existing.trunk_ids) != list(desired.trunk_ids)
        or existing.rule != desired.rule
        or dict(existing.attributes) != dict(desired.attributes)
        or existing.room_config != desired.room_config
        or list(existing.inbound_numbers) != list(desired.inbound_numbers)
    )


# --- conflicts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberConflict:
    """A number this VoiceAgent lists that belongs to someone else."""

    number: str
    holder: str
    """Who has it, for people: 'VoiceAgent ns/name (SIP trunk ST_x)' or similar."""

    def describe(self) -> str:
        return f"{self.number} is already served by {self.holder}"


@dataclass(frozen=True)
class Resolution:
    in_service: tuple[str, ...]
    conflicts: tuple[NumberConflict, ...]


def _describe_trunk_holder(trunk: SIPInboundTrunkInfo) -> str:
    owner = owner_of(trunk.name)
    if owner is not None:
        return f"VoiceAgent {owner} (SIP trunk {trunk.sip_trunk_id})"
    return f"SIP trunk {trunk.sip_trunk_id} {trunk.name!r}, which VoiceFleet does not manage"


def resolve_numbers(
    target: TelephonyTarget,
    trunks: Iterable[SIPInboundTrunkInfo],
    claims: Iterable[Claim],
) -> Resolution:
    """Split the target's numbers into those it may serve and those someone else keeps.

    `trunks` are all inbound trunks in LiveKit, `claims` all VoiceAgents with numbers the
    operator can see (the target's own trunk and claim may be among them; they are skipped).
    """
    me = object_name(target.namespace, target.name)
    held: dict[str, SIPInboundTrunkInfo] = {}
    for trunk in sorted(trunks, key=lambda t: t.sip_trunk_id):
        if trunk.name == me:
            continue
        for number in trunk.numbers:
            held.setdefault(normalize_number(number), trunk)
    my_precedence = target.claim.precedence
    earlier: dict[str, Claim] = {}
    for claim in sorted(claims, key=lambda c: c.precedence):
        if claim.key == target.key or claim.precedence >= my_precedence:
            continue
        for number in claim.numbers:
            earlier.setdefault(normalize_number(number), claim)

    in_service: list[str] = []
    conflicts: list[NumberConflict] = []
    seen: set[str] = set()
    for number in target.numbers:
        normal = normalize_number(number)
        if normal in seen:
            continue
        seen.add(normal)
        holder_trunk = held.get(normal)
        earlier_claim = earlier.get(normal)
        if holder_trunk is not None:
            conflicts.append(NumberConflict(number, _describe_trunk_holder(holder_trunk)))
        elif earlier_claim is not None:
            conflicts.append(
                NumberConflict(
                    number,
                    f"VoiceAgent {earlier_claim.key}, which claimed it first "
                    f"({earlier_claim.created})",
                )
            )
        else:
            in_service.append(number)
    return Resolution(tuple(in_service), tuple(conflicts))


# --- results and the condition --------------------------------------------------------------


@dataclass(frozen=True)
class ProvisionResult:
    trunk_id: str | None
    dispatch_rule_id: str | None
    numbers: tuple[str, ...]
    """Numbers in service (on the trunk)."""
    conflicts: tuple[NumberConflict, ...] = ()
    changes: tuple[str, ...] = ()
    """What this pass changed in LiveKit, e.g. 'created SIP trunk ST_x' (no secrets)."""

    def status(self) -> dict[str, object]:
        """The VoiceAgent's status.telephony."""
        return {
            "trunkID": self.trunk_id,
            "dispatchRuleID": self.dispatch_rule_id,
            "numbers": list(self.numbers),
        }


@dataclass(frozen=True)
class ConditionText:
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


def ready_condition(result: ProvisionResult, dispatch_name: str) -> ConditionText:
    """TelephonyReady after a provisioning pass that reached LiveKit."""
    if result.conflicts:
        parts = [c.describe() for c in result.conflicts]
        serving = (
            f"; serving {', '.join(result.numbers)}" if result.numbers else "; no number in service"
        )
        return ConditionText(
            "False",
            REASON_NUMBER_CONFLICT,
            "; ".join(parts) + " (the first claimant keeps a number)" + serving,
        )
    if not result.numbers:
        return ConditionText(
            "True", REASON_NO_NUMBERS, "spec.telephony.numbers is empty: no SIP trunk is needed"
        )
    return ConditionText(
        "True",
        REASON_PROVISIONED,
        f"{', '.join(result.numbers)} dispatched to agent {dispatch_name!r} "
        f"(SIP trunk {result.trunk_id}, dispatch rule {result.dispatch_rule_id})",
    )


def error_condition(error: Exception, retry_in: float) -> ConditionText:
    return ConditionText(
        "False",
        REASON_LIVEKIT_ERROR,
        f"{error}; retrying in {retry_in:.0f}s",
    )


def retry_delay(retry: int) -> float:
    """Backoff after `retry` earlier failures: 5, 10, 20 ... seconds, at most 5 minutes."""
    return float(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, min(retry, 16))))


AUTH_USERNAME_KEY = "username"
AUTH_PASSWORD_KEY = "password"


def read_auth_secret(data: dict[str, str], secret_name: str) -> SipAuth:
    """Credentials from the authSecretRef Secret's decoded data (keys username and password).

    The error names the missing key and the fix, never a value.
    """
    missing = [key for key in (AUTH_USERNAME_KEY, AUTH_PASSWORD_KEY) if not data.get(key)]
    if missing:
        raise ValueError(
            f"spec.telephony.inbound.authSecretRef: Secret {secret_name!r} has no non-empty "
            f"key {', '.join(repr(k) for k in missing)}; add it to the Secret"
        )
    return SipAuth(username=data[AUTH_USERNAME_KEY], password=data[AUTH_PASSWORD_KEY])


# --- the provisioner ------------------------------------------------------------------------


def _is_trunk_conflict(error: Exception) -> bool:
    # livekit-server refuses a second trunk for a number: our view of the trunks was stale.
    return "Conflicting inbound SIP Trunks" in str(error.__cause__ or error)


def _is_not_found(error: Exception) -> bool:
    cause = error.__cause__ or error
    return getattr(cause, "code", None) == "not_found"


class TelephonyProvisioner:
    """Creates, updates and deletes VoiceAgents' SIP trunks and dispatch rules in LiveKit.

    Stateless across calls: every pass lists what LiveKit has and converges it, so a new
    instance (a restarted operator) carries on where an old one stopped.
    """

    def __init__(self, lkapi: LiveKitAPI) -> None:
        self._sip = lkapi.sip

    async def list_trunks(self) -> list[SIPInboundTrunkInfo]:
        response = await self._call(
            "list SIP inbound trunks", self._sip.list_inbound_trunk(ListSIPInboundTrunkRequest())
        )
        return list(response.items)

    async def list_rules(self) -> list[SIPDispatchRuleInfo]:
        response = await self._call(
            "list SIP dispatch rules", self._sip.list_dispatch_rule(ListSIPDispatchRuleRequest())
        )
        return list(response.items)

    async def ensure(self, target: TelephonyTarget, claims: Iterable[Claim]) -> ProvisionResult:
        """Converge the target's trunk and rule; returns what is in service and what is not."""
        claims = list(claims)
        # A second pass only when livekit-server refused a trunk we thought free.
        for _ in range(3):
            try:
                return await self._ensure_once(target, claims)
            except _StaleView:
                continue
        raise TelephonyError(
            f"SIP trunks kept changing while provisioning {target.key}; will try again"
        )

    async def _ensure_once(self, target: TelephonyTarget, claims: list[Claim]) -> ProvisionResult:
        name = object_name(target.namespace, target.name)
        changes: list[str] = []
        trunks = await self.list_trunks()
        resolution = resolve_numbers(target, trunks, claims)
        rules = [r for r in await self.list_rules() if r.name == name]
        own_trunks = [t for t in trunks if t.name == name]

        if not resolution.in_service:
            await self._delete_rules(rules, changes)
            for trunk in own_trunks:
                await self._delete_trunk(trunk.sip_trunk_id, changes)
            return ProvisionResult(None, None, (), resolution.conflicts, tuple(changes))

        desired_trunk = render_inbound_trunk(target, resolution.in_service)
        in_use = {trunk_id for rule in rules for trunk_id in rule.trunk_ids}
        mine = await self._keep_one_trunk(own_trunks, in_use, desired_trunk, changes)
        if mine is None:
            try:
                trunk = await self._call(
                    f"create SIP trunk for {target.key}",
                    self._sip.create_inbound_trunk(
                        CreateSIPInboundTrunkRequest(trunk=desired_trunk)
                    ),
                )
            except TelephonyError as error:
                if _is_trunk_conflict(error):
                    raise _StaleView from error
                raise
            changes.append(f"created SIP trunk {trunk.sip_trunk_id}")
        elif trunk_differs(mine, desired_trunk):
            try:
                trunk = await self._call(
                    f"update SIP trunk {mine.sip_trunk_id}",
                    self._sip.update_inbound_trunk(mine.sip_trunk_id, desired_trunk),
                )
            except TelephonyError as error:
                if _is_trunk_conflict(error):
                    raise _StaleView from error
                raise
            changes.append(f"updated SIP trunk {trunk.sip_trunk_id}")
        else:
            trunk = mine

        desired_rule = render_dispatch_rule(target, trunk.sip_trunk_id)
        rule = await self._keep_one_rule(rules, changes)
        if rule is None:
            rule = await self._call(
                f"create SIP dispatch rule for {target.key}",
                self._sip.create_dispatch_rule(
                    CreateSIPDispatchRuleRequest(dispatch_rule=desired_rule)
                ),
            )
            changes.append(f"created SIP dispatch rule {rule.sip_dispatch_rule_id}")
        elif rule_differs(rule, desired_rule):
            rule = await self._call(
                f"update SIP dispatch rule {rule.sip_dispatch_rule_id}",
                self._sip.update_dispatch_rule(rule.sip_dispatch_rule_id, desired_rule),
            )
            changes.append(f"updated SIP dispatch rule {rule.sip_dispatch_rule_id}")

        return ProvisionResult(
            trunk.sip_trunk_id,
            rule.sip_dispatch_rule_id,
            tuple(trunk.numbers),
            resolution.conflicts,
            tuple(changes),
        )

    async def remove(self, namespace: str, name: str) -> tuple[str, ...]:
        """Delete the VoiceAgent's rules and trunks (all of them, if ever duplicated).

        Idempotent: objects already gone are not an error. Returns what was deleted.
        """
        wanted = object_name(namespace, name)
        changes: list[str] = []
        await self._delete_rules([r for r in await self.list_rules() if r.name == wanted], changes)
        for trunk in await self.list_trunks():
            if trunk.name == wanted:
                await self._delete_trunk(trunk.sip_trunk_id, changes)
        return tuple(changes)

    async def _keep_one_trunk(
        self,
        trunks: list[SIPInboundTrunkInfo],
        in_use: set[str],
        desired: SIPInboundTrunkInfo,
        changes: list[str],
    ) -> SIPInboundTrunkInfo | None:
        """One of our trunks; any extra one (e.g. two operators racing) is deleted.

        Kept: the one our dispatch rule uses, then one already as desired, then the smallest
        ID (livekit-server leaves created_at empty, so age cannot decide).
        """
        if not trunks:
            return None
        ordered = sorted(
            trunks,
            key=lambda t: (
                t.sip_trunk_id not in in_use,
                trunk_differs(t, desired),
                t.sip_trunk_id,
            ),
        )
        for extra in ordered[1:]:
            await self._delete_trunk(extra.sip_trunk_id, changes)
        return ordered[0]

    async def _keep_one_rule(
        self, rules: list[SIPDispatchRuleInfo], changes: list[str]
    ) -> SIPDispatchRuleInfo | None:
        if not rules:
            return None
        ordered = sorted(rules, key=lambda r: r.sip_dispatch_rule_id)
        await self._delete_rules(ordered[1:], changes)
        return ordered[0]

    async def _delete_trunk(self, trunk_id: str, changes: list[str]) -> None:
        try:
            await self._call(
                f"delete SIP trunk {trunk_id}",
                self._sip.delete_trunk(DeleteSIPTrunkRequest(sip_trunk_id=trunk_id)),
            )
        except TelephonyError as error:
            if not _is_not_found(error):
                raise
        changes.append(f"deleted SIP trunk {trunk_id}")

    async def _delete_rules(self, rules: Sequence[SIPDispatchRuleInfo], changes: list[str]) -> None:
        for rule in rules:
            rule_id = rule.sip_dispatch_rule_id
            try:
                await self._call(
                    f"delete SIP dispatch rule {rule_id}",
                    self._sip.delete_dispatch_rule(
                        DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule_id)
                    ),
                )
            except TelephonyError as error:
                if not _is_not_found(error):
                    raise
            changes.append(f"deleted SIP dispatch rule {rule_id}")

    @staticmethod
    async def _call(what: str, request: Awaitable[T]) -> T:
        """Await one API call; any failure becomes a TelephonyError saying what failed."""
        try:
            return await request
        except Exception as error:
            raise TelephonyError(f"LiveKit SIP API: {what} failed: {_describe(error)}") from error


class _StaleView(Exception):
    """LiveKit's trunks changed between our list and our write."""


def _describe(error: Exception) -> str:
    code = getattr(error, "code", None)
    message = getattr(error, "message", None)
    status = getattr(error, "status", None)
    if code and isinstance(message, str):
        text = f"{code}: {message}" if message else str(code)
        # A 401 from a wrong API secret comes without a Twirp body: the status says it.
        return f"{text} (HTTP {status})" if isinstance(status, int) else text
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
