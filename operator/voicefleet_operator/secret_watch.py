"""Rotated Secrets roll the workers within seconds: Secrets are watched, not polled.

A VoiceAgent's workers get the keys of the tenant Secrets its spec names (copied into the worker
namespace, their hash on the pod template) and the platform's LiveKit key. Before this watch a
rotated key reached the workers only with the next resync (VOICEFLEET_RESYNC_SECONDS, 60 s by
default). Now:

- an in-memory kopf index maps each (namespace, Secret) to the VoiceAgents that name it;
- a change to one of those Secrets reconciles exactly those VoiceAgents (the reconcile copies the
  new keys, the pod template's secrets hash changes, the Deployment rolls its workers with the
  usual surge-and-drain, no call cut);
- a change to the platform's LiveKit Secret reconciles every VoiceAgent.

Events for every other Secret are dropped by the index lookup before any work; the initial
listing (kopf's event type None, at start-up) is left to the resume handlers, which reconcile
everything anyway. The watch needs list/watch on Secrets (the chart's ClusterRole says why).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from voicefleet_operator import render
from voicefleet_operator.api import GROUP, PLURAL, VERSION, SpecError, parse_spec
from voicefleet_operator.context import OperatorContext

log = logging.getLogger(__name__)

EVERY_VOICEAGENT = "*"
"""Index key under which every VoiceAgent is listed (for the platform's LiveKit Secret)."""


def referenced_secrets(spec: Mapping[str, Any]) -> set[str]:
    """Names of the Secrets a VoiceAgent spec names (secretRefs and header secretKeyRefs). An
    invalid spec still names its secretRefs: the Secret a tenant is about to create or fix is
    often what makes it valid."""
    try:
        parsed = parse_spec(dict(spec))
    except SpecError:
        refs = spec.get("secretRefs") or []
        return {str(ref["name"]) for ref in refs if isinstance(ref, Mapping) and "name" in ref}
    names = {ref.name for ref in parsed.secret_refs}
    names.update(use.secret for use in render.secret_key_uses(parsed))
    return names


Reconcile = Callable[[OperatorContext, str, str], Awaitable[object]]


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext, reconcile: Reconcile) -> None:
    """Register the index and the Secret watch on `registry` (called by __main__.build, which
    passes handlers.reconcile: handler modules never import each other)."""
    settings = ctx.settings
    platform_secret = (settings.livekit_secret_namespace, settings.livekit_secret_name)

    @kopf.index(GROUP, VERSION, PLURAL, id="secret_users", registry=registry)
    def secret_users(
        *, namespace: str | None, name: str | None, spec: Mapping[str, Any], **_: Any
    ) -> dict[object, tuple[str, str]]:
        agent = (str(namespace), str(name))
        keys: dict[object, tuple[str, str]] = {EVERY_VOICEAGENT: agent}
        for secret in referenced_secrets(spec):
            keys[(str(namespace), secret)] = agent
        return keys

    def users(namespace: str, name: str, index: kopf.Index[Any, Any]) -> set[tuple[str, str]]:
        if (namespace, name) == platform_secret:
            return set(index.get(EVERY_VOICEAGENT, ()))
        return set(index.get((namespace, name), ()))

    @kopf.on.event("", "v1", "secrets", registry=registry)
    async def secret_changed(
        *,
        type: str,
        namespace: str | None,
        name: str,
        **kwargs: Any,
    ) -> None:
        if not type:  # None for the initial listing: the resume handlers reconcile everything
            return
        agents = users(str(namespace), str(name), kwargs["secret_users"])
        if not agents:
            return
        if (str(namespace), str(name)) == platform_secret:
            ctx.forget_platform_secret()
        log.info(
            "Secret %s/%s %s: reconciling %d VoiceAgent(s)",
            namespace,
            name,
            type.lower(),
            len(agents),
        )
        for agent_namespace, agent_name in sorted(agents):
            await reconcile(ctx, agent_namespace, agent_name)
