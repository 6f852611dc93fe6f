"""What every handler module of one operator run shares: settings, the API client, locks.

Handler modules (handlers.py, telephony_handlers.py) import this module and reporting.py, never
each other; `__main__.build()` makes one `OperatorContext` and registers every handler module
with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from voicefleet_operator.kube import Kube
from voicefleet_operator.settings import PlatformSettings


@dataclass
class OperatorContext:
    """State shared by all handlers of one operator run."""

    settings: PlatformSettings
    kube: Kube
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """The per-VoiceAgent lock: every step that reads and writes one VoiceAgent's children,
        status or LiveKit objects holds it, so they never act on each other's stale reads."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())
