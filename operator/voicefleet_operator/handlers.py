"""Kopf handlers: glue between the VoiceAgents, rendering, API calls and status.

One `reconcile()` turns a VoiceAgent into its children, in clear steps:

  1. read the VoiceAgent fresh (a timer's or an event's body may be stale);
  2. validate: the schema (pydantic, the same models as the CRD), then what the schema cannot
     see: referenced Secrets and keys, provider API keys. Problems set ConfigValid=False with a
     message naming the field, post an Event, and STOP: the last good children keep running;
  3. make sure the tenant's worker namespace `vf-<namespace>` exists with its observer RBAC
     (worker_namespace.py); read the platform's LiveKit Secret and the existing children there
     (a name taken by an object this VoiceAgent does not own is reported, never taken over);
  4. render every child (render.py, pure);
  5. server-side apply each one as `voicefleet-operator` (idempotent; Deployment last); then
     delete what an older operator left in the tenant namespace (the LiveKit key's copy);
  6. write status (status.py, pure maths) and post Events for what changed.

Children live in the worker namespace, out of the tenant's reach (operator/README.md, "Tenant
isolation"); owner references cannot cross namespaces, so they carry the VoiceAgent's uid as a
label and its finalizer (`finalize`) deletes them, and the worker namespace with the tenant's
last VoiceAgent.

Who calls it: create/update/resume handlers; a resync timer (drift, rotated Secrets); a fast
recheck timer while ConfigValid or Reconciled is False (a missing Secret appears); the watcher of
owned Deployments when one is deleted. The watcher otherwise only refreshes replicas, readiness
and the WorkersAvailable condition. Calls for one VoiceAgent are serialised by a lock.

Wiring: `register()` adds these handlers to a kopf registry; `__main__.build()` registers this
module and telephony_handlers.py with one shared `OperatorContext` (context.py). Status and
Events go through reporting.py, which every handler module uses under the per-VoiceAgent lock;
handler modules never import each other. `replicas_for()` is the one place the reconcile decides
replicas (it keeps the current value, so an autoscaler that patches the Deployment's replicas is
not fought).

Kopf's own bookkeeping lives in annotations under `voicefleet.dev/`, never in the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
from voicefleet_runtime.config import PROVIDER_KEY_ENV, ConfigError

from voicefleet_operator import (
    autoscaler,
    image_policy,
    metrics,
    platform_features,
    render,
    worker_namespace,
)
from voicefleet_operator.api import (
    CONDITION_CONFIG_VALID,
    DNS1035_LABEL,
    GROUP,
    NAME_MAX_LENGTH,
    PLURAL,
    VERSION,
    SpecError,
    VoiceAgentSpec,
    VoiceAgentStatus,
    parse_spec,
)
from voicefleet_operator.capacity import (
    CONDITION_CAPACITY_LIMITED,
    PODS_UNSCHEDULABLE,
    capacity_event,
    no_worker_can_start,
)
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import Kube, KubeError
from voicefleet_operator.reporting import post_event, write_status
from voicefleet_operator.scaling import ScalingPolicy, demand_replicas
from voicefleet_operator.settings import LIVEKIT_SECRET_KEYS
from voicefleet_operator.status import (
    CONDITION_RECONCILED,
    ConditionUpdate,
    WorkloadFacts,
    find_condition,
    is_false,
)

log = logging.getLogger(__name__)

# --- validation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something wrong with a VoiceAgent that the schema could not catch (or did)."""

    reason: str
    message: str
    """`field.path: what is wrong; how to fix it`."""


@dataclass
class Checked:
    """A valid spec and the Secrets' data the workers will read ({name: data})."""

    spec: VoiceAgentSpec
    secrets: dict[str, dict[str, str]]


def validate_spec(body: Mapping[str, Any]) -> tuple[VoiceAgentSpec | None, list[Problem]]:
    problems: list[Problem] = []
    name = str(body["metadata"]["name"])
    if len(name) > NAME_MAX_LENGTH or not re.match(DNS1035_LABEL, name):
        problems.append(
            Problem(
                "InvalidName",
                f"metadata.name: {name!r} must be a DNS-1035 label of at most "
                f"{NAME_MAX_LENGTH} characters (the children's names derive from it); "
                "recreate the VoiceAgent under a shorter name",
            )
        )
    namespace = str(body["metadata"].get("namespace", ""))
    if len(namespace) > render.TENANT_NAMESPACE_MAX_LENGTH:
        problems.append(
            Problem(
                "NamespaceTooLong",
                f"metadata.namespace: {namespace!r} is longer than "
                f"{render.TENANT_NAMESPACE_MAX_LENGTH} characters, so its worker namespace "
                f"{render.worker_namespace(namespace)!r} cannot exist (a namespace name has at "
                "most 63); create the VoiceAgent in a namespace with a shorter name",
            )
        )
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as error:
        problems.append(Problem("InvalidSpec", str(error)))
        return None, problems
    try:
        render.runtime_config(render.VoiceAgentRef.from_body(body), spec)
    except ConfigError as error:
        problems.append(Problem("InvalidSpec", f"runtime config: {error}"))
    return (spec if not problems else None), problems


async def check_secrets(
    kube: Kube, namespace: str, spec: VoiceAgentSpec
) -> tuple[dict[str, dict[str, str]], list[Problem]]:
    """Every Secret and key the spec refers to exists; provider API keys are provided."""
    secrets: dict[str, dict[str, str] | None] = {}

    async def data_of(name: str) -> dict[str, str] | None:
        if name not in secrets:
            secret = await kube.get("Secret", namespace, name)
            secrets[name] = dict(secret.get("data") or {}) if secret is not None else None
        return secrets[name]

    problems: list[Problem] = []
    for index, ref in enumerate(spec.secret_refs):
        if await data_of(ref.name) is None:
            problems.append(
                Problem(
                    "SecretNotFound",
                    f"spec.secretRefs[{index}].name: Secret {ref.name!r} not found in namespace "
                    f"{namespace!r}; create it or fix the name",
                )
            )
    for use in render.secret_key_uses(spec):
        data = await data_of(use.secret)
        if data is None:
            problems.append(
                Problem(
                    "SecretNotFound",
                    f"{use.field}.name: Secret {use.secret!r} not found in namespace "
                    f"{namespace!r}; create it or fix the name",
                )
            )
        elif use.key not in data:
            keys = ", ".join(sorted(data)) or "none"
            problems.append(
                Problem(
                    "SecretKeyNotFound",
                    f"{use.field}.key: Secret {use.secret!r} has no key {use.key!r} "
                    f"(its keys: {keys}); add the key or fix the reference",
                )
            )
    provided = {key for ref in spec.secret_refs for key in (secrets.get(ref.name) or {})}
    pipeline = spec.pipeline
    parts = [
        ("stt", pipeline.stt.provider),
        ("llm", pipeline.llm.provider),
        ("tts", pipeline.tts.provider),
    ]
    if pipeline.realtime is not None:  # the realtime model replaces the three
        parts = [("realtime", pipeline.realtime.provider)]
    for part, provider in parts:
        variable = PROVIDER_KEY_ENV.get(provider)
        if variable and variable not in provided:
            listed = ", ".join(repr(ref.name) for ref in spec.secret_refs) or "none listed"
            problems.append(
                Problem(
                    "ProviderKeyMissing",
                    f"spec.secretRefs: no Secret provides {variable}, which "
                    f"spec.pipeline.{part}.provider {provider!r} needs (Secrets: {listed}); "
                    f"add key {variable} to a Secret listed in spec.secretRefs",
                )
            )
    found = {name: data for name, data in secrets.items() if data is not None}
    return found, problems


# --- replicas ------------------------------------------------------------------------------


def replicas_for(spec: VoiceAgentSpec, deployment: Mapping[str, Any] | None) -> int:
    """Replicas the reconcile applies: the pin, else the Deployment's current value (an
    autoscaler's or an HPA's) kept within bounds, else what spareJobs needs at no load."""
    policy = ScalingPolicy.from_spec(spec)
    if policy.pinned_replicas is not None:
        return policy.pinned_replicas
    current = (deployment or {}).get("spec", {}).get("replicas")
    if current is None:
        return demand_replicas(0, policy)
    if spec.scaling.mode == "hpa":
        return int(current)
    return max(policy.min_replicas, min(policy.max_replicas, int(current)))


# --- the reconcile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did."""

    applied: bool
    """Children were applied (ConfigValid and Reconciled are True)."""
    reason: str = ""


async def reconcile(ctx: OperatorContext, namespace: str, name: str) -> Outcome:
    """Bring VoiceAgent `namespace/name`'s children in line with its spec (see module doc)."""
    async with ctx.lock(namespace, name):
        with metrics.observe_reconcile(namespace, name) as record:
            body = await ctx.kube.get("VoiceAgent", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                # The finalizer (finalize) removes the children.
                return record.done(Outcome(False, "Gone"))
            try:
                return record.done(await _reconcile(ctx, body))
            finally:
                ctx.mark_reconciled(namespace, name)  # an attempt, whatever came of it


async def _reconcile(ctx: OperatorContext, body: dict[str, Any]) -> Outcome:
    ref = render.VoiceAgentRef.from_body(body)
    generation = int(body["metadata"].get("generation", 0))
    names = render.ChildNames.of(ref.name)
    status_of: dict[str, Any] = {
        "generation": generation,
        "observed_generation": generation,
        "uid": ref.uid,
    }

    # 2. validate
    spec, problems = validate_spec(body)
    secrets: dict[str, dict[str, str]] = {}
    if spec is not None:
        secrets, problems = await check_secrets(ctx.kube, ref.namespace, spec)
        problems += [
            Problem("ImageNotAllowed", message)
            for message in image_policy.image_problems(spec, ctx.settings)
        ]
        problems += [
            Problem("NeedsLiveKitCloud", message)
            for message in platform_features.platform_problems(spec, ctx.settings)
        ]
    if spec is None or problems:
        deployment = await _owned(ctx, ref, "Deployment", names.deployment)
        await write_status(
            ctx,
            ref.namespace,
            ref.name,
            updates=[
                ConditionUpdate.false(
                    CONDITION_CONFIG_VALID,
                    problems[0].reason,
                    "\n".join(p.message for p in problems),
                )
            ],
            facts=WorkloadFacts.from_deployment(deployment),
            body=body,
            **status_of,
        )
        log.info("%s/%s: invalid (%s)", ref.namespace, ref.name, problems[0].reason)
        return Outcome(False, problems[0].reason)
    valid = ConditionUpdate.true(CONDITION_CONFIG_VALID, "Valid", "the configuration is valid")

    # 3. the worker namespace, the platform Secret and existing children
    try:
        await _ensure_worker_namespace(ctx, ref.namespace)
    except worker_namespace.NamespaceTaken as error:
        return await _not_reconciled(ctx, ref, status_of, valid, "NamespaceConflict", str(error))
    except (KubeError, aiohttp.ClientError) as error:
        what = f"preparing the worker namespace {ref.worker_namespace!r} failed: {error}"
        return await _not_reconciled(ctx, ref, status_of, valid, "ApplyFailed", what)
    try:
        livekit_data = await _platform_livekit_data(ctx)
        existing = await _existing_children(ctx, ref)
    except (KubeError, aiohttp.ClientError) as error:
        return await _not_reconciled(ctx, ref, status_of, valid, "ApiError", str(error))
    if livekit_data is None:
        settings = ctx.settings
        return await _not_reconciled(
            ctx,
            ref,
            status_of,
            valid,
            "LiveKitSecretMissing",
            f"the platform Secret {settings.livekit_secret_namespace}/"
            f"{settings.livekit_secret_name} with keys {', '.join(LIVEKIT_SECRET_KEYS)} is "
            "missing or incomplete; the platform team must create it (Helm value "
            "livekit.existingSecret or livekit.apiKey/apiSecret)",
        )
    # A foreign HPA of the same name matters only when this VoiceAgent renders one.
    if not render.hpa_owns_replicas(spec):
        existing = {
            key: obj for key, obj in existing.items() if key[0] != "HorizontalPodAutoscaler"
        }
    foreign = [
        f"{obj['kind']} {obj['metadata']['name']!r}"
        for obj in existing.values()
        if obj is not None and not render.owned_by(obj, ref)
    ]
    if foreign:
        return await _not_reconciled(
            ctx,
            ref,
            status_of,
            valid,
            "NameConflict",
            f"{', '.join(foreign)} already exist(s) in namespace {ref.worker_namespace!r} "
            "and belong(s) to something else; delete or rename it, or rename the VoiceAgent",
        )

    # 4. render
    names = render.ChildNames.of(ref.name)
    replicas = replicas_for(spec, existing.get(("Deployment", names.deployment)))
    # "platform/livekit" cannot clash with a tenant Secret: names have no slash.
    secrets_data = {
        **secrets,
        "platform/livekit": {k: livekit_data[k] for k in LIVEKIT_SECRET_KEYS},
    }
    rendered = render.render_all(
        ref,
        spec,
        ctx.settings,
        livekit_data=livekit_data,
        secrets_hash=render.secrets_hash(secrets_data),
        replicas=replicas,
        secrets=secrets,
    )

    # 5. apply, Deployment last
    applied: dict[str, dict[str, Any]] = {}
    for child in rendered.children:
        try:
            applied[child["kind"]] = await ctx.kube.apply(child)
        except (KubeError, aiohttp.ClientError) as error:
            what = f"applying {child['kind']} {child['metadata']['name']!r} failed: {error}"
            return await _not_reconciled(ctx, ref, status_of, valid, "ApplyFailed", what)
    try:
        await _remove_unrendered_hpa(ctx, ref, spec)
    except (KubeError, aiohttp.ClientError) as error:
        what = "removing the HorizontalPodAutoscaler (scaling.mode is not hpa) failed: "
        return await _not_reconciled(ctx, ref, status_of, valid, "ApplyFailed", what + str(error))
    created = sorted({kind for (kind, _), obj in existing.items() if obj is None})
    if (body.get("status") or {}).get("workerNamespace") != ref.worker_namespace:
        # Upgrading from workers in the tenant namespace: the new ones are applied; the old
        # ones (and the LiveKit key's copy there) go.
        try:
            removed = await worker_namespace.remove_legacy_children(ctx.kube, ref)
        except (KubeError, aiohttp.ClientError) as error:
            what = f"removing the children left in namespace {ref.namespace!r} failed: {error}"
            return await _not_reconciled(ctx, ref, status_of, valid, "ApplyFailed", what)
        if removed:
            log.info(
                "%s/%s: moved to %s; removed %s",
                ref.namespace,
                ref.name,
                ref.worker_namespace,
                ", ".join(removed),
            )

    # 6. status and events
    result = await write_status(
        ctx,
        ref.namespace,
        ref.name,
        updates=[
            valid,
            ConditionUpdate.true(
                CONDITION_RECONCILED,
                "Applied",
                f"{len(rendered.children)} children match generation {generation}",
            ),
        ],
        facts=WorkloadFacts.from_deployment(applied["Deployment"]),
        fields=VoiceAgentStatus(
            dispatch_name=ref.dispatch_name,
            worker_namespace=ref.worker_namespace,
            config_hash=rendered.config_hash,
            desired_replicas=replicas,
        ),
        body=body,
        **status_of,
    )
    if result is not None:
        _, old, _ = result
        if created or old.get("observedGeneration") != generation:
            # A new spec (or new children): the autoscaler, maybe idle at zero, looks now.
            ctx.nudge_autoscaler(ref.namespace, ref.name)
            for warning in platform_features.platform_warnings(spec, ctx.settings):
                post_event(body, "Warning", "PlatformFeatureMissing", warning)
        if created:
            post_event(
                body,
                "Normal",
                "Created",
                f"created {', '.join(created)} in namespace {ref.worker_namespace}",
            )
        previous_hash = old.get("configHash")
        if previous_hash and previous_hash != rendered.config_hash:
            post_event(
                body,
                "Normal",
                "RollingOut",
                f"runtime config changed ({previous_hash} -> {rendered.config_hash}); "
                "rolling out new workers, old ones drain their calls",
            )
    log.info(
        "%s/%s: applied generation %d (config %s, %d replicas)",
        ref.namespace,
        ref.name,
        generation,
        rendered.config_hash,
        replicas,
    )
    return Outcome(True, "Applied")


async def _ensure_worker_namespace(ctx: OperatorContext, tenant: str) -> None:
    """worker_namespace.ensure, once for all of a tenant's reconciles within
    WORKER_NAMESPACE_SECONDS (context.py) while the tenant's RoleBindings mirror to the same
    subjects (read on every reconcile, so a change is mirrored at once); 1000 VoiceAgents over
    20 tenants otherwise made 5000 calls, 4000 of them identical."""
    async with ctx.worker_namespace_lock(tenant):
        bindings = await ctx.kube.list("RoleBinding", tenant)
        subjects = worker_namespace.observer_subjects(bindings)
        if ctx.worker_namespace_ready(tenant, subjects):
            return
        await worker_namespace.ensure(ctx.kube, tenant, subjects=subjects)
        ctx.mark_worker_namespace(tenant, subjects)


async def _not_reconciled(
    ctx: OperatorContext,
    ref: render.VoiceAgentRef,
    status_of: dict[str, Any],
    valid: ConditionUpdate,
    reason: str,
    message: str,
) -> Outcome:
    """Children could not all be applied: say why and keep whatever already runs. Unless the
    VoiceAgent went into deletion meanwhile: then the failure is the deletion's doing (its worker
    namespace is terminating: "unable to create new content"), not an error to report."""
    # Whatever failed, the next reconcile prepares the worker namespace again.
    ctx.mark_worker_namespace(ref.namespace, None)
    try:
        current = await ctx.kube.get("VoiceAgent", ref.namespace, ref.name)
    except (KubeError, aiohttp.ClientError):
        current = {}  # cannot tell: report the failure
    if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
        log.info("%s/%s: deletion under way, not reconciled: %s", ref.namespace, ref.name, message)
        return Outcome(False, "Gone")
    log.warning("%s/%s: not reconciled (%s): %s", ref.namespace, ref.name, reason, message)
    metrics.RECONCILE_ERRORS.labels(ref.namespace, ref.name, reason).inc()
    deployment = await _owned(ctx, ref, "Deployment", render.ChildNames.of(ref.name).deployment)
    await write_status(
        ctx,
        ref.namespace,
        ref.name,
        updates=[valid, ConditionUpdate.false(CONDITION_RECONCILED, reason, message)],
        facts=WorkloadFacts.from_deployment(deployment),
        **status_of,
    )
    return Outcome(False, reason)


async def _platform_livekit_data(ctx: OperatorContext) -> dict[str, str] | None:
    secret = await ctx.platform_livekit_secret()
    data = dict((secret or {}).get("data") or {})
    if secret is None or any(not data.get(key) for key in LIVEKIT_SECRET_KEYS):
        return None
    return data


async def _existing_children(
    ctx: OperatorContext, ref: render.VoiceAgentRef
) -> dict[tuple[str, str], dict[str, Any] | None]:
    """{(kind, name): the object in the worker namespace or None} for every child's name."""
    names = render.ChildNames.of(ref.name)
    wanted = [
        ("ServiceAccount", names.service_account),
        ("Secret", names.livekit_secret),
        ("Secret", names.tenant_secrets),
        ("ConfigMap", names.config_map),
        ("Service", names.service),
        ("PodDisruptionBudget", names.pod_disruption_budget),
        ("NetworkPolicy", names.network_policy),
        ("Deployment", names.deployment),
        ("HorizontalPodAutoscaler", names.deployment),
    ]
    found = await asyncio.gather(
        *(ctx.kube.get(kind, ref.worker_namespace, name) for kind, name in wanted)
    )
    return dict(zip(wanted, found, strict=True))


async def _remove_unrendered_hpa(
    ctx: OperatorContext, ref: render.VoiceAgentRef, spec: VoiceAgentSpec
) -> None:
    """Leaving mode hpa (or pinning): the operator's autoscaler takes the replicas back."""
    if render.hpa_owns_replicas(spec):
        return
    name = render.ChildNames.of(ref.name).deployment
    if await _owned(ctx, ref, "HorizontalPodAutoscaler", name) is not None:
        await ctx.kube.delete("HorizontalPodAutoscaler", ref.worker_namespace, name)


async def _owned(
    ctx: OperatorContext, ref: render.VoiceAgentRef, kind: str, name: str
) -> dict[str, Any] | None:
    """The child `kind`/`name` of `ref` in its worker namespace, None if absent or another's."""
    try:
        obj = await ctx.kube.get(kind, ref.worker_namespace, name)
    except (KubeError, aiohttp.ClientError):
        return None
    return obj if obj is not None and render.owned_by(obj, ref) else None


# --- deletion (the finalizer) ---------------------------------------------------------------


async def finalize(ctx: OperatorContext, namespace: str, name: str, uid: str) -> None:
    """The VoiceAgent is being deleted: delete its children in the worker namespace (no owner
    reference does it) and the namespace itself with the tenant's last VoiceAgent. Raises on
    API errors, so that kopf retries and the finalizer stays until it succeeded."""
    ref = render.VoiceAgentRef(name, namespace, uid)
    async with ctx.lock(namespace, name):
        deleted = await worker_namespace.delete_children(ctx.kube, ref)
        gone = await worker_namespace.delete_if_unused(ctx.kube, namespace, name)
        if gone:
            ctx.mark_worker_namespace(namespace, None)
    log.info(
        "%s/%s: deleted %s%s",
        namespace,
        name,
        ", ".join(deleted) or "no children",
        f"; namespace {ref.worker_namespace} (the tenant's last VoiceAgent)" if gone else "",
    )


# --- the worker Deployment's state ----------------------------------------------------------


async def refresh_workers(
    ctx: OperatorContext, deployment: Mapping[str, Any], deleted: bool
) -> None:
    """Deployment changed: update replicas, readiness and WorkersAvailable of its owner (the
    VoiceAgent its labels name, in the tenant namespace)."""
    owner = render.owner_of(deployment)
    if owner is None:
        return
    namespace, name, uid = owner
    if deleted:
        # Deleted behind the operator's back (the owner's own deletion is no concern: then the
        # reconcile finds the VoiceAgent gone or terminating).
        await reconcile(ctx, namespace, name)
        return
    async with ctx.lock(namespace, name):
        await write_status(
            ctx, namespace, name, facts=WorkloadFacts.from_deployment(deployment), uid=uid
        )
    # The autoscaler looks now (it may be idle at zero: a changed Deployment may end that).
    ctx.nudge_autoscaler(namespace, name)


# --- autoscaling ---------------------------------------------------------------------------


IDLE_INTERVAL_SECONDS = 30.0
"""How often a fleet idle at zero is evaluated (no replica, no worker pod, no caller waiting).
Everything that can end that is a nudge: a caller the standby takes (wake.py), a reconcile of a
new generation, a change of the worker Deployment. At 1000 idle VoiceAgents the 5 s interval
alone was ~800 API requests a second."""


def idle_at_zero(evaluation: autoscaler.Evaluation, waiting: int) -> bool:
    """The evaluation kept zero replicas with no worker pod and nobody waiting: nothing for
    the autoscaler to watch until something nudges it."""
    decision = evaluation.decision
    return (
        not waiting
        and decision is not None
        and decision.replicas == 0
        and evaluation.replicas_before == 0
        and evaluation.fleet is not None
        and not evaluation.fleet.workers
    )


async def autoscale(ctx: OperatorContext, namespace: str, name: str) -> bool:
    """One autoscaler evaluation (autoscaler.py). Under the reconcile's lock: the reconcile
    re-applies the replicas it reads, so the two must never act on stale reads. True when the
    fleet is idle at zero (`idle_at_zero`)."""
    async with ctx.lock(namespace, name):
        body = await ctx.kube.get("VoiceAgent", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False
        wake = ctx.wake(namespace, name)
        try:
            evaluation = await autoscaler.evaluate(
                ctx.kube,
                body,
                namespace_cap=ctx.settings.namespace_call_limit(namespace),
                waiting_calls=len(wake.waiting),
            )
        except (KubeError, aiohttp.ClientError) as error:
            # Nothing changed; the next evaluation tries again (unreachable workers are not
            # errors: they count as full).
            metrics.SCALING_ERRORS.labels(namespace, name).inc()
            log.warning("%s/%s: autoscaling failed: %s", namespace, name, error)
            return False
        # The standby (wake.py) hands its held callers over once a worker has registered.
        wake.registered_workers = evaluation.registered_workers
        wake.evaluated = True
        if evaluation.registered_workers:
            wake.worker_registered.set()
        else:
            wake.worker_registered.clear()
        why = await _no_worker_can_start(ctx.kube, body, evaluation)
        wake.observe_unschedulable(why, time.monotonic())
        facts = None
        if evaluation.deployment is not None:
            facts = WorkloadFacts.from_deployment(evaluation.deployment)
        updates = [evaluation.condition]
        capacity_change = None
        if evaluation.capacity is not None:
            updates.append(evaluation.capacity)
            previous = find_condition(
                (body.get("status") or {}).get("conditions") or [], CONDITION_CAPACITY_LIMITED
            )
            capacity_change = capacity_event(previous, evaluation.capacity)
        await write_status(
            ctx,
            namespace,
            name,
            updates=updates,
            facts=facts,
            fields=VoiceAgentStatus.model_validate(evaluation.status_fields),
            uid=body["metadata"]["uid"],
            body=body,
        )
    if evaluation.event is not None:
        event = evaluation.event
        post_event(body, event.type, event.reason, event.message)
    if capacity_change is not None:
        post_event(body, *capacity_change)
    return idle_at_zero(evaluation, len(wake.waiting))


async def _no_worker_can_start(
    kube: Kube, body: Mapping[str, Any], evaluation: autoscaler.Evaluation
) -> str:
    """Why no worker of the fleet can register soon, or "" (capacity.no_worker_can_start).

    Only a fleet with no registered worker whose CapacityLimited is PodsUnschedulable (both
    from this evaluation) has its pods read again, to tell "every pod is stuck" from "one pod
    is stuck and another is starting"; every other fleet costs nothing more."""
    capacity = evaluation.capacity
    if (
        evaluation.registered_workers
        or capacity is None
        or capacity.status != "True"
        or capacity.reason != PODS_UNSCHEDULABLE
    ):
        return ""
    ref = render.VoiceAgentRef.from_body(body)
    selector = ",".join(f"{k}={v}" for k, v in render.selector_labels(ref.name).items())
    try:
        pods = await kube.list("Pod", ref.worker_namespace, selector)
    except (KubeError, aiohttp.ClientError) as error:
        log.warning("%s/%s: reading the worker pods failed: %s", ref.namespace, ref.name, error)
        return ""
    return no_worker_can_start(pods)


# --- kopf wiring ---------------------------------------------------------------------------


def _needs_recheck(status: Mapping[str, Any], meta: Mapping[str, Any], **_: Any) -> bool:
    """Invalid, not applied, or a generation not acted on yet.

    The last case is the level-based safety net behind kopf's update handlers: kopf keeps one
    progress record per handler and cause, so a change that arrives while another handler of
    an earlier change is still pending (or in an operator killed at that moment) is merged into
    that cause, and a handler that already succeeded for it is not run again. A reconcile that
    has not seen the current generation is therefore re-run from here.
    """
    conditions = status.get("conditions") or []
    observed = status.get("observedGeneration")
    return (
        is_false(conditions, CONDITION_CONFIG_VALID)
        or is_false(conditions, CONDITION_RECONCILED)
        or observed is None
        or observed < int(meta.get("generation") or 0)
    )


def _recheck_wanted(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> bool:
    """The recheck timer's filter: `_needs_recheck`, and for a new VoiceAgent (no
    observedGeneration) only once this run has attempted it (see register)."""
    return _needs_recheck(status, meta) and (
        status.get("observedGeneration") is not None or ctx.attempted(namespace, name)
    )


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the core handlers on `registry`, bound to `ctx` (called by __main__.build)."""
    settings = ctx.settings
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    async def reconcile_voiceagent(*, name: str, namespace: str | None, **_: Any) -> None:
        # Never raises for a bad spec or an API hiccup: those are in the status, and the
        # recheck timer retries while ConfigValid or Reconciled is False (or the generation
        # was not acted on).
        await reconcile(ctx, str(namespace), name)

    # A new VoiceAgent (no observedGeneration yet) only after this run has attempted it: its
    # create handler always runs, and under load it may start long after the VoiceAgent
    # appeared (at 1000 new VoiceAgents a recheck every 5 s then started a second reconcile of
    # each one still queued, doubling the work when the API server had the least to spare; in
    # the filter, kopf does not even run the timer: 200 runs a second). A VoiceAgent with a
    # generation behind is rechecked in any case: that is the merged-cause hole above, where no
    # kopf handler runs again (also after a restart). Never within half an interval of the
    # last attempt, nor while another step holds the lock (a reconcile under way reads fresh).
    def recheck_wanted(
        name: str, namespace: str | None, status: kopf.Status, meta: kopf.Meta, **_: Any
    ) -> bool:
        return _recheck_wanted(ctx, str(namespace), name, status, meta)

    @kopf.timer(
        *resource,
        interval=settings.recheck_invalid_seconds,
        initial_delay=settings.recheck_invalid_seconds,
        when=recheck_wanted,
        registry=registry,
    )
    async def recheck_voiceagent(*, name: str, namespace: str | None, **_: Any) -> None:
        # The filter has already waited for the first attempt (kopf spawns the timer only when
        # it holds, and neither observedGeneration nor an attempt goes away).
        namespace = str(namespace)
        if ctx.lock(namespace, name).locked() or ctx.reconciled_within(
            namespace, name, settings.recheck_invalid_seconds / 2
        ):
            return
        await reconcile(ctx, namespace, name)

    # Skipped when something else (a create, an update, a recheck) reconciled the VoiceAgent
    # within half the interval: at 1000 VoiceAgents the first resyncs landed on VoiceAgents
    # still being created, a third of all reconciles of a slow 300 run. So a VoiceAgent is
    # reconciled at least every 1.5 resync intervals.
    @kopf.timer(
        *resource,
        interval=settings.resync_seconds,
        initial_delay=settings.resync_seconds,
        registry=registry,
    )
    async def resync_voiceagent(*, name: str, namespace: str | None, **_: Any) -> None:
        if ctx.reconciled_within(str(namespace), name, settings.resync_seconds / 2):
            return
        await reconcile(ctx, str(namespace), name)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={render.LABEL_MANAGED_BY: render.MANAGED_BY},
        registry=registry,
    )
    async def worker_deployment_event(*, type: str | None, body: kopf.Body, **_: Any) -> None:
        await refresh_workers(ctx, body, deleted=type == "DELETED")

    # A daemon, not a timer: a 5 s loop per VoiceAgent, without kopf logging every run.
    @kopf.daemon(*resource, cancellation_timeout=10, registry=registry)
    async def autoscale_voiceagent(
        *, name: str, namespace: str | None, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        while not stopped:
            wake = ctx.wake(str(namespace), name)
            wake.nudge.clear()
            idle = False
            try:
                idle = await autoscale(ctx, str(namespace), name)
            except Exception:  # never let one bad evaluation end the loop
                log.exception("%s/%s: autoscaler evaluation failed", namespace, name)
            # Every second while the standby holds callers of a fleet waking from zero (and at
            # once when it takes one, or something else nudges), every IDLE_INTERVAL_SECONDS
            # while idle at zero, else every INTERVAL_SECONDS.
            interval = autoscaler.INTERVAL_SECONDS
            if wake.waiting:
                interval = autoscaler.WAKING_INTERVAL_SECONDS
            elif idle:
                interval = IDLE_INTERVAL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.nudge.wait(), interval)

    # Not optional: the finalizer stays until the children in the worker namespace are gone.
    @kopf.on.delete(*resource, registry=registry)
    async def delete_worker_children(
        *, name: str, namespace: str | None, uid: str | None, **_: Any
    ) -> None:
        await finalize(ctx, str(namespace), name, str(uid))

    @kopf.on.delete(*resource, optional=True, registry=registry)
    async def forget_voiceagent_metrics(*, name: str, namespace: str | None, **_: Any) -> None:
        metrics.forget_voiceagent(str(namespace), name)
        ctx.forget_reconciled(str(namespace), name)
