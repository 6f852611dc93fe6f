"""Kopf glue for phone numbers: provisioning step, finalizer, drift check, number claims.

telephony.py holds the logic (rendering, who gets a number, the livekit-api provisioner); this
module runs it for each VoiceAgent and writes what is true into its status:

- on create/update/resume (its own handler, beside the core reconcile): converge the SIP trunk
  and dispatch rule; TelephonyReady and status.telephony / status.numbers say the outcome. A
  LiveKit failure sets TelephonyReady=False (LiveKitError, with the next retry in the message)
  and raises kopf.TemporaryError with a growing delay: retried with backoff, never a crash loop;
- a timer (every TELEPHONY_CHECK_SECONDS) re-runs the same step for VoiceAgents with numbers, so
  a trunk or rule deleted behind the operator's back comes back, a number freed by its holder
  is handed over, and a rotated auth Secret reaches the trunk;
- an on.delete handler deletes the trunk and rule of a VoiceAgent that has (or may have had)
  LiveKit objects before the VoiceAgent goes (the operator's finalizer holds it until then);
- an index of every watched VoiceAgent's numbers (`number_claims`) decides simultaneous claims.

Crash consistency with LiveKit. LiveKit objects are always found by name (telephony.py), never
by an ID remembered in the status: a status write can be lost (operator killed between the
LiveKit call and the write, or the write failing), a name cannot. What tells the operator that a
VoiceAgent may own LiveKit objects is the annotation `voicefleet.dev/livekit-sip`, written
*before* the first trunk or rule is created for it (write-ahead) and removed only after a removal
by name has left nothing behind. While it is present, removal (numbers gone from the spec),
the drift timer and deletion run and find the objects by name, whatever the status says; a
VoiceAgent that never had numbers costs no LiveKit call.

Every step for one VoiceAgent runs under the per-VoiceAgent lock of the shared context
(context.py), so a deletion never races a creation, and status writes and Events go through
reporting.py, as the core handlers' do. `__main__.build()` registers this module.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from livekit import api as livekit_api

from voicefleet_operator import metrics, telephony
from voicefleet_operator.api import (
    CONDITION_TELEPHONY_READY,
    GROUP,
    PLURAL,
    VERSION,
    SpecError,
    TelephonyStatus,
    VoiceAgentStatus,
    parse_spec,
)
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import NotFound
from voicefleet_operator.render import dispatch_name
from voicefleet_operator.reporting import StatusWrite, post_event, write_status
from voicefleet_operator.settings import LIVEKIT_API_KEY, LIVEKIT_API_SECRET
from voicefleet_operator.status import ConditionUpdate, find_condition
from voicefleet_operator.telephony import (
    Claim,
    ProvisionResult,
    TelephonyError,
    TelephonyProvisioner,
    TelephonyTarget,
    ringing_timeout_for,
)

log = logging.getLogger(__name__)

LIVEKIT_OBJECTS_ANNOTATION = "voicefleet.dev/livekit-sip"
"""Present (value: the LiveKit object name) while LiveKit may hold this VoiceAgent's SIP trunk or
dispatch rule; written before they are created, removed after they are removed."""

TELEPHONY_CHECK_SECONDS = 30.0
"""How often LiveKit's side is compared with the spec (drift, handed-over numbers)."""
AUTH_SECRET_RETRY_SECONDS = 10.0


def _decode(data: Mapping[str, str], key: str) -> str:
    try:
        return base64.b64decode(data.get(key) or "").decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""


class LiveKitClients:
    """The operator's livekit-api client, made from the platform Secret when first needed and
    remade when its credentials change (a rotated Secret)."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self._client: livekit_api.LiveKitAPI | None = None
        self._credentials: tuple[str, str, str] | None = None

    async def provisioner(self) -> TelephonyProvisioner:
        settings = self.ctx.settings
        secret = await self.ctx.kube.get(
            "Secret", settings.livekit_secret_namespace, settings.livekit_secret_name
        )
        data = (secret or {}).get("data") or {}
        key, secret_value = _decode(data, LIVEKIT_API_KEY), _decode(data, LIVEKIT_API_SECRET)
        if not key or not secret_value:
            raise TelephonyError(
                f"the platform Secret {settings.livekit_secret_namespace}/"
                f"{settings.livekit_secret_name} with keys {LIVEKIT_API_KEY} and "
                f"{LIVEKIT_API_SECRET} is missing or incomplete; the platform team must create it"
            )
        credentials = (settings.effective_livekit_api_url, key, secret_value)
        if self._client is None or credentials != self._credentials:
            await self.close()
            # failover=False: a self-hosted LiveKit has no other regions to fail over to.
            self._client = livekit_api.LiveKitAPI(*credentials, failover=False)
            self._credentials = credentials
        return TelephonyProvisioner(self._client)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# --- one VoiceAgent -------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncOutcome:
    result: ProvisionResult | None
    retry_in: float | None = None
    """Set when the step failed and should be retried after this many seconds."""


def claim_of(body: Mapping[str, Any]) -> Claim | None:
    """The numbers a VoiceAgent claims, for the index (None while it is being deleted)."""
    metadata = body.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return None
    numbers = (((body.get("spec") or {}).get("telephony")) or {}).get("numbers") or []
    if not numbers:
        return None
    return Claim(
        str(metadata.get("namespace")),
        str(metadata.get("name")),
        str(metadata.get("creationTimestamp")),
        tuple(str(n) for n in numbers),
    )


def may_own_livekit_objects(body: Mapping[str, Any]) -> bool:
    """LiveKit may hold a trunk or rule of this VoiceAgent: the write-ahead annotation, or IDs
    in the status (written by operators that predate the annotation)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    recorded = ((body.get("status") or {}).get("telephony")) or {}
    return bool(
        annotations.get(LIVEKIT_OBJECTS_ANNOTATION)
        or recorded.get("trunkID")
        or recorded.get("dispatchRuleID")
    )


def has_telephony(body: Mapping[str, Any]) -> bool:
    """Numbers in the spec, or LiveKit objects possibly left: removal, drift check and the
    deletion handler must run (and find LiveKit's objects by name)."""
    numbers = (((body.get("spec") or {}).get("telephony")) or {}).get("numbers")
    return bool(numbers) or may_own_livekit_objects(body)


async def sync(
    ctx: OperatorContext,
    clients: LiveKitClients,
    namespace: str,
    name: str,
    claims: list[Claim],
    *,
    retry: int = 0,
) -> SyncOutcome:
    """Converge one VoiceAgent's SIP trunk and dispatch rule with its spec; write the status."""
    async with ctx.lock(namespace, name):
        body = await ctx.kube.get("VoiceAgent", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return SyncOutcome(None)  # the finalizer handler removes what LiveKit has
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError:
            return SyncOutcome(None)  # ConfigValid=False says why; what runs keeps running
        uid = str(body["metadata"]["uid"])
        numbers = tuple(spec.telephony.numbers) if spec.telephony else ()
        try:
            if not numbers:
                return await _without_numbers(ctx, clients, body, uid)
            auth = await _auth(ctx, namespace, spec.telephony)
        except _AuthSecretProblem as problem:
            metrics.TELEPHONY_ERRORS.labels(namespace, name, telephony.REASON_SECRET_INVALID).inc()
            await _write(
                ctx,
                body,
                uid,
                ConditionUpdate.false(
                    CONDITION_TELEPHONY_READY, telephony.REASON_SECRET_INVALID, str(problem)
                ),
            )
            return SyncOutcome(None, AUTH_SECRET_RETRY_SECONDS)
        except TelephonyError as error:
            return await _failed(ctx, body, uid, error, retry)
        assert spec.telephony is not None
        inbound = spec.telephony.inbound
        target = TelephonyTarget(
            namespace=namespace,
            name=name,
            created=str(body["metadata"]["creationTimestamp"]),
            dispatch_name=dispatch_name(namespace, name),
            numbers=numbers,
            allowed_addresses=tuple(inbound.allowed_addresses) if inbound else (),
            auth=auth,
            ringing_timeout_seconds=ringing_timeout_for(ctx.settings.wake_timeout_seconds),
        )
        try:
            provisioner = await clients.provisioner()
            await _record_livekit_objects(ctx, body)
            result = await provisioner.ensure(target, claims)
        except TelephonyError as error:
            return await _failed(ctx, body, uid, error, retry)
        condition = telephony.ready_condition(result, target.dispatch_name)
        written = await _write(
            ctx,
            body,
            uid,
            ConditionUpdate(
                CONDITION_TELEPHONY_READY,
                condition.status,
                condition.reason,
                condition.message,
            ),
            result,
        )
    _events(body, result, written)
    return SyncOutcome(result)


class _AuthSecretProblem(Exception):
    pass


async def _auth(ctx: OperatorContext, namespace: str, spec: Any) -> telephony.SipAuth | None:
    ref = spec.inbound.auth_secret_ref if spec.inbound else None
    if ref is None:
        return None
    secret = await ctx.kube.get("Secret", namespace, ref.name)
    if secret is None:
        raise _AuthSecretProblem(
            f"spec.telephony.inbound.authSecretRef.name: Secret {ref.name!r} not found in "
            f"namespace {namespace!r}; create it with keys username and password"
        )
    data = secret.get("data") or {}
    decoded = {key: _decode(data, key) for key in data}
    try:
        return telephony.read_auth_secret(decoded, ref.name)
    except ValueError as error:
        raise _AuthSecretProblem(str(error)) from None


async def _without_numbers(
    ctx: OperatorContext, clients: LiveKitClients, body: dict[str, Any], uid: str
) -> SyncOutcome:
    """No numbers (any more): remove what LiveKit has for this VoiceAgent and the condition."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    changes: tuple[str, ...] = ()
    if may_own_livekit_objects(body):
        # By name: also what a killed operator created but never recorded in the status.
        changes = await (await clients.provisioner()).remove(namespace, name)
    await write_status(
        ctx,
        namespace,
        name,
        updates=[ConditionUpdate.remove(CONDITION_TELEPHONY_READY)],
        fields=VoiceAgentStatus(telephony=None, numbers=None),
        uid=uid,
    )
    await _forget_livekit_objects(ctx, body)
    if changes:
        post_event(body, "Normal", "TelephonyRemoved", "; ".join(changes))
    return SyncOutcome(ProvisionResult(None, None, (), (), changes))


async def _record_livekit_objects(ctx: OperatorContext, body: Mapping[str, Any]) -> None:
    """Write-ahead: annotate the VoiceAgent before LiveKit may hold anything of it, so that a
    crash or a lost status write after the LiveKit call still leaves removal to be done.

    Raises KubeError when the write fails: then nothing is created, and kopf retries."""
    metadata = body["metadata"]
    value = telephony.object_name(metadata["namespace"], metadata["name"])
    if (metadata.get("annotations") or {}).get(LIVEKIT_OBJECTS_ANNOTATION) != value:
        await _annotate(ctx, metadata, value)


async def _forget_livekit_objects(ctx: OperatorContext, body: Mapping[str, Any]) -> None:
    """After a removal by name left nothing in LiveKit (and the status says so)."""
    metadata = body["metadata"]
    if LIVEKIT_OBJECTS_ANNOTATION in (metadata.get("annotations") or {}):
        try:
            await _annotate(ctx, metadata, None)
        except NotFound:
            pass  # deleted meanwhile: nothing left to remember


async def _annotate(ctx: OperatorContext, metadata: Mapping[str, Any], value: str | None) -> None:
    # The uid is a precondition: never annotate a namesake created in the meantime.
    patch = {
        "metadata": {"uid": metadata["uid"], "annotations": {LIVEKIT_OBJECTS_ANNOTATION: value}}
    }
    await ctx.kube.merge_patch("VoiceAgent", metadata["namespace"], metadata["name"], patch)


async def _failed(
    ctx: OperatorContext, body: dict[str, Any], uid: str, error: TelephonyError, retry: int
) -> SyncOutcome:
    delay = telephony.retry_delay(retry)
    condition = telephony.error_condition(error, delay)
    metadata = body["metadata"]
    metrics.TELEPHONY_ERRORS.labels(metadata["namespace"], metadata["name"], condition.reason).inc()
    log.warning(
        "%s/%s: telephony: %s", body["metadata"]["namespace"], body["metadata"]["name"], error
    )
    await _write(
        ctx,
        body,
        uid,
        ConditionUpdate(
            CONDITION_TELEPHONY_READY, condition.status, condition.reason, condition.message
        ),
    )
    return SyncOutcome(None, delay)


async def _write(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    uid: str,
    condition: ConditionUpdate,
    result: ProvisionResult | None = None,
) -> StatusWrite | None:
    fields = None
    if result is not None:
        fields = VoiceAgentStatus(
            telephony=TelephonyStatus.model_validate(result.status()),
            numbers=", ".join(result.numbers) or None,
        )
    return await write_status(
        ctx,
        str(body["metadata"]["namespace"]),
        str(body["metadata"]["name"]),
        generation=int(body["metadata"].get("generation", 0)),
        updates=[condition],
        fields=fields,
        uid=uid,
    )


def _events(
    body: Mapping[str, Any],
    result: ProvisionResult,
    written: StatusWrite | None,
) -> None:
    if result.changes:
        post_event(body, "Normal", "TelephonyProvisioned", "; ".join(result.changes))
    if written is None:
        return
    _, old, new = written
    before = find_condition(old.get("conditions") or [], CONDITION_TELEPHONY_READY) or {}
    after = find_condition(new.get("conditions") or [], CONDITION_TELEPHONY_READY) or {}
    if after.get("reason") == telephony.REASON_NUMBER_CONFLICT and (
        before.get("reason") != after.get("reason") or before.get("message") != after.get("message")
    ):
        post_event(body, "Warning", telephony.REASON_NUMBER_CONFLICT, str(after.get("message")))
    elif after.get("status") == "True" and before.get("status") != "True":
        post_event(body, "Normal", "TelephonyReady", str(after.get("message")))


async def remove(ctx: OperatorContext, clients: LiveKitClients, namespace: str, name: str) -> None:
    """The finalizer's work: delete the VoiceAgent's trunk and rule (raises TelephonyError)."""
    async with ctx.lock(namespace, name):
        changes = await (await clients.provisioner()).remove(namespace, name)
    log.info("%s/%s: telephony removed: %s", namespace, name, "; ".join(changes) or "nothing")


# --- kopf wiring ----------------------------------------------------------------------------


def _claims(kwargs: Mapping[str, Any]) -> list[Claim]:
    """The claims index, which kopf passes by the index function's name."""
    index: kopf.Index[str, Claim] = kwargs["number_claims"]
    return list(index.get("claims", []))


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the telephony handlers next to the core ones (called by __main__.build)."""
    resource = (GROUP, VERSION, PLURAL)
    clients = LiveKitClients(ctx)

    @kopf.index(*resource, id="number_claims", registry=registry)
    def number_claims(body: kopf.Body, **_: Any) -> dict[str, Claim] | None:
        claim = claim_of(body)
        return {"claims": claim} if claim is not None else None

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec.telephony", registry=registry)
    async def provision_telephony(
        *,
        name: str,
        namespace: str | None,
        retry: int,
        **kwargs: Any,
    ) -> None:
        outcome = await sync(ctx, clients, str(namespace), name, _claims(kwargs), retry=retry)
        if outcome.retry_in is not None:
            # The condition already says what failed; kopf retries after the delay.
            raise kopf.TemporaryError("telephony not provisioned yet", delay=outcome.retry_in)

    @kopf.timer(
        *resource,
        interval=TELEPHONY_CHECK_SECONDS,
        initial_delay=TELEPHONY_CHECK_SECONDS,
        when=lambda body, **_: has_telephony(body),
        registry=registry,
    )
    async def check_telephony(*, name: str, namespace: str | None, **kwargs: Any) -> None:
        # Failures are in the condition; the next tick tries again.
        await sync(ctx, clients, str(namespace), name, _claims(kwargs))

    @kopf.on.delete(*resource, when=lambda body, **_: has_telephony(body), registry=registry)
    async def remove_telephony(*, name: str, namespace: str | None, retry: int, **_: Any) -> None:
        try:
            await remove(ctx, clients, str(namespace), name)
        except TelephonyError as error:
            delay = telephony.retry_delay(retry)
            log.warning("%s/%s: telephony removal failed: %s", namespace, name, error)
            raise kopf.TemporaryError(f"{error}; retrying in {delay:.0f}s", delay=delay) from None

    @kopf.on.cleanup(registry=registry)
    async def close_livekit_client(**_: Any) -> None:
        await clients.close()
