"""What the operator tells about a VoiceAgent: its status and its Kubernetes Events.

Every handler module writes status through `write_status` (one merge of observations into the
current status, retried on write conflicts, under the caller's per-VoiceAgent lock) and posts
Events through `post_event`; Events for condition transitions are derived here, once, so every
writer gets them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from voicefleet_operator import metrics
from voicefleet_operator.api import (
    CONDITION_CONFIG_VALID,
    CONDITION_READY,
    CONDITION_WORKERS_AVAILABLE,
    VoiceAgentStatus,
)
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import retry_on_conflict
from voicefleet_operator.status import (
    CONDITION_RECONCILED,
    ConditionUpdate,
    WorkloadFacts,
    find_condition,
    next_status,
)

log = logging.getLogger(__name__)

StatusWrite = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
"""(body, old status, new status) of a status write."""


def post_event(body: Mapping[str, Any], type: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the VoiceAgent (names and fields only: never a secret value)."""
    try:
        kopf.event(cast(kopf.Body, dict(body)), type=type, reason=reason, message=message[:1024])
    except LookupError:
        # Outside a running operator (unit use of reconcile) there is no event poster.
        log.info("event %s %s: %s", type, reason, message)


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    patch = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None  # merge patch removes a field only when told
    return patch


async def write_status(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    *,
    generation: int | None = None,
    updates: list[ConditionUpdate] | None = None,
    facts: WorkloadFacts | None = None,
    fields: VoiceAgentStatus | None = None,
    observed_generation: int | None = None,
    uid: str | None = None,
    body: Mapping[str, Any] | None = None,
) -> StatusWrite | None:
    """Merge observations into the VoiceAgent's status (retried on write conflicts).

    `generation` is the spec generation the updates were computed from (the conditions'
    observedGeneration); None means "the one last reconciled". Returns (body, old, new) status,
    or None when the VoiceAgent is gone (or is another object with the same name than `uid`).
    Events for condition transitions are posted here, so every writer gets them.

    `body`: the VoiceAgent as the caller just read it under the same lock; the first attempt
    starts from it instead of reading it again (the write is conditional on its
    resourceVersion, so a stale one costs a conflict and a fresh read, never a lost update).
    """
    given = [dict(body)] if body is not None else []

    async def attempt() -> StatusWrite | None:
        body = given.pop() if given else await ctx.kube.get("VoiceAgent", namespace, name)
        if body is None or (uid is not None and body["metadata"].get("uid") != uid):
            return None
        old = dict(body.get("status") or {})
        effective_generation = generation
        if effective_generation is None:
            effective_generation = old.get("observedGeneration")
        new = next_status(
            old,
            generation=effective_generation,
            updates=updates or [],
            facts=facts,
            fields=fields,
            observed_generation=observed_generation,
        )
        if new != old:
            patch = {
                "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                "status": _status_patch(old, new),
            }
            await ctx.kube.merge_patch("VoiceAgent", namespace, name, patch, subresource="status")
        return body, old, new

    result = await retry_on_conflict(5, attempt)
    if result is not None:
        body, old, new = result
        metrics.observe_status(namespace, name, new)
        for type, reason, message in condition_events(old, new):
            post_event(body, type, reason, message)
    return result


def condition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of Events a tenant should see for this status change."""
    events = []
    old_conditions = old.get("conditions") or []
    for condition in new.get("conditions") or []:
        before = find_condition(old_conditions, condition["type"])
        changed = before is None or before.get("status") != condition["status"]
        reworded = before is not None and before.get("message") != condition["message"]
        kind, status = condition["type"], condition["status"]
        message = condition["message"]
        if kind == CONDITION_READY and status == "True" and changed:
            events.append(("Normal", "Ready", message))
        elif kind in (CONDITION_CONFIG_VALID, CONDITION_RECONCILED) and status == "False":
            if changed or reworded:
                events.append(("Warning", condition["reason"], message))
        elif kind == CONDITION_CONFIG_VALID and status == "True" and changed and before:
            events.append(("Normal", "ConfigValid", "the configuration is valid again"))
        elif (
            kind == CONDITION_WORKERS_AVAILABLE
            and status == "False"
            and changed
            and condition["reason"] in ("WorkersUnavailable", "RolloutStalled")
        ):
            events.append(("Warning", condition["reason"], message))
    return events
