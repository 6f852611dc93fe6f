"""What every handler module of one operator run shares: settings, the API client, locks.

Handler modules (handlers.py, telephony_handlers.py) import this module and reporting.py, never
each other; `__main__.build()` makes one `OperatorContext` and registers every handler module
with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any

from voicefleet_operator.kube import Kube
from voicefleet_operator.settings import LIVEKIT_SECRET_KEYS, PlatformSettings

UNSCHEDULABLE_CONFIRM_SECONDS = 3.0
"""How long every worker pod must stay unschedulable before the standby stops holding callers
(WakeState.observe_unschedulable; the autoscaler evaluates every second while callers wait)."""


@dataclass
class WakeState:
    """A fleet scaled to zero and the callers the operator's standby holds for it (wake.py),
    shared with the autoscaler (handlers.autoscale), which counts the callers as demand and
    says when a worker has registered."""

    waiting: dict[str, float] = field(default_factory=dict)
    """Room -> monotonic time the standby took its caller's job."""
    registered_workers: int = 0
    """Serving worker pods registered with LiveKit, at the last autoscaler evaluation."""
    evaluated: bool = False
    """The autoscaler has evaluated the fleet at least once (registered_workers is known)."""
    worker_registered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while registered_workers > 0 (the autoscaler evaluates every second while callers
    wait)."""
    nudge: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to have the autoscaler evaluate now instead of at its next interval."""
    no_worker_can_start: str = ""
    """Why no worker can register soon (no worker registered and every worker pod is
    unschedulable: capacity.no_worker_can_start), at the last autoscaler evaluation; "" when
    a wake may happen. Held and new callers then get the treatment at once."""
    blocked: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no_worker_can_start is not empty."""
    unschedulable_since: float | None = None
    """Monotonic time the autoscaler first saw every worker pod unschedulable (this spell)."""

    def observe_unschedulable(self, why: str, now: float) -> None:
        """One autoscaler evaluation's finding (capacity.no_worker_can_start; "" for none). It
        counts once it has held for UNSCHEDULABLE_CONFIRM_SECONDS: a scheduler's verdict can be
        short-lived (preemption under way, a pod being bound by another scheduler, resources
        being freed by a terminating pod), and callers should not be turned away for it."""
        if not why:
            self.unschedulable_since = None
            self.no_worker_can_start = ""
            self.blocked.clear()
            return
        if self.unschedulable_since is None:
            self.unschedulable_since = now
        if now - self.unschedulable_since >= UNSCHEDULABLE_CONFIRM_SECONDS:
            self.no_worker_can_start = why
            self.blocked.set()


PLATFORM_SECRET_SECONDS = 2.0
"""How long one read of the platform's LiveKit Secret serves every handler: every standby check
(each VoiceAgent, every 2 s) and every reconcile read it, which at 1000 VoiceAgents was ~500
GETs a second of the same object. A rotated key is seen at most this much later."""

WORKER_NAMESPACE_SECONDS = 10.0
"""How long a tenant's worker namespace, once prepared (worker_namespace.ensure: four API
calls after the RoleBindings' list), counts as ready for the tenant's other reconciles while
the mirrored subjects stay the same; a failed reconcile forgets it at once."""


@dataclass
class OperatorContext:
    """State shared by all handlers of one operator run."""

    settings: PlatformSettings
    kube: Kube
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _wakes: dict[tuple[str, str], WakeState] = field(default_factory=dict)
    _platform_secret: tuple[float, dict[str, Any] | None] | None = None
    _platform_secret_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _worker_namespaces: dict[str, tuple[float, Any]] = field(default_factory=dict)
    _worker_namespace_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _reconciled_at: dict[tuple[str, str], float] = field(default_factory=dict)
    orphan_sweep: object | None = None
    """wake.OrphanSweep, made by the first standby that registers."""

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """The per-VoiceAgent lock: every step that reads and writes one VoiceAgent's children,
        status or LiveKit objects holds it, so they never act on each other's stale reads."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def wake(self, namespace: str, name: str) -> WakeState:
        """The VoiceAgent's wake state (created empty on first use)."""
        return self._wakes.setdefault((namespace, name), WakeState())

    def forget_wake(self, namespace: str, name: str) -> None:
        self._wakes.pop((namespace, name), None)

    def mark_reconciled(self, namespace: str, name: str) -> None:
        """A reconcile of the VoiceAgent has just ended (whatever its outcome)."""
        self._reconciled_at[(namespace, name)] = time.monotonic()

    def attempted(self, namespace: str, name: str) -> bool:
        """This operator run has ended at least one reconcile of the VoiceAgent."""
        return (namespace, name) in self._reconciled_at

    def reconciled_within(self, namespace: str, name: str, seconds: float) -> bool:
        """This operator run ended a reconcile of the VoiceAgent less than `seconds` ago."""
        at = self._reconciled_at.get((namespace, name))
        return at is not None and time.monotonic() - at < seconds

    def forget_reconciled(self, namespace: str, name: str) -> None:
        self._reconciled_at.pop((namespace, name), None)

    def worker_namespace_lock(self, tenant: str) -> asyncio.Lock:
        """Held while the tenant's worker namespace is prepared (one at a time per tenant)."""
        return self._worker_namespace_locks.setdefault(tenant, asyncio.Lock())

    def worker_namespace_ready(self, tenant: str, prepared_with: Any) -> bool:
        """Prepared with `prepared_with` less than WORKER_NAMESPACE_SECONDS ago."""
        at, used = self._worker_namespaces.get(tenant, (None, None))
        return (
            at is not None
            and time.monotonic() - at < WORKER_NAMESPACE_SECONDS
            and used == prepared_with
        )

    def mark_worker_namespace(self, tenant: str, prepared_with: Any = None) -> None:
        """Prepared now with `prepared_with`; None: forget it (prepare again next time)."""
        if prepared_with is not None:
            self._worker_namespaces[tenant] = (time.monotonic(), prepared_with)
        else:
            self._worker_namespaces.pop(tenant, None)

    def nudge_autoscaler(self, namespace: str, name: str) -> None:
        """Have the VoiceAgent's autoscaler evaluate now (nothing if it has no wake state:
        its daemon has not started yet, and starts with an evaluation, or it has ended)."""
        state = self._wakes.get((namespace, name))
        if state is not None:
            state.nudge.set()

    def forget_platform_secret(self) -> None:
        """The platform's LiveKit Secret changed (secret_watch.py): the next read is fresh."""
        self._platform_secret = None

    async def platform_livekit_secret(self) -> dict[str, Any] | None:
        """The platform's LiveKit Secret (None when missing), read at most once per
        PLATFORM_SECRET_SECONDS for all handlers together; concurrent callers share one read.
        A failed read raises and is not remembered."""
        async with self._platform_secret_lock:
            cached = self._platform_secret
            if cached is not None and time.monotonic() - cached[0] < PLATFORM_SECRET_SECONDS:
                return cached[1]
            settings = self.settings
            secret = await self.kube.get(
                "Secret", settings.livekit_secret_namespace, settings.livekit_secret_name
            )
            self._platform_secret = (time.monotonic(), secret)
            return secret

    async def livekit_credentials(self) -> tuple[str, str, str] | None:
        """(API URL, key, secret) from the platform Secret; None when it is missing or
        incomplete (the reconcile says so in the status)."""
        settings = self.settings
        secret = await self.platform_livekit_secret()
        data = (secret or {}).get("data") or {}
        try:
            key, value = (base64.b64decode(data.get(k) or "").decode() for k in LIVEKIT_SECRET_KEYS)
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not key or not value:
            return None
        return settings.effective_livekit_api_url, key, value
