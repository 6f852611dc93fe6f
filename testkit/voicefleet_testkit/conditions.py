"""A VoiceAgent's status conditions as tests and the demo read them: one lookup, one wait.

The VoiceAgent is read by the caller (`read_agent`): the integration tests read it through the
Kubernetes client, the e2e tests and the demo through kubectl.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from voicefleet_testkit.waiting import wait_for


def condition(agent: Mapping[str, Any], type: str) -> dict[str, Any] | None:
    """The condition `type` of a VoiceAgent (as read from the API server), or None."""
    conditions = (agent.get("status") or {}).get("conditions") or []
    return next((dict(found) for found in conditions if found["type"] == type), None)


def wait_condition(
    what: str,
    read_agent: Callable[[], Mapping[str, Any]],
    type: str,
    status: str,
    *,
    reason: str | None = None,
    generation: int | None = None,
    timeout: float = 60,
    interval: float = 0.5,
    describe: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Wait until condition `type` has `status` (and `reason`, and `observedGeneration` equal to
    `generation`, when given); return the VoiceAgent then. `describe` adds context to the
    timeout message (e.g. the cluster's diagnostics)."""

    def probe() -> dict[str, Any] | None:
        agent = read_agent()
        found = condition(agent, type)
        if found is None or found["status"] != status:
            return None
        if reason is not None and found.get("reason") != reason:
            return None
        if generation is not None and found.get("observedGeneration") != generation:
            return None
        return dict(agent)

    wanted = f"{type}={status}" + (f" ({reason})" if reason else "")
    return wait_for(f"{wanted} on {what}", probe, timeout, interval, describe=describe)
