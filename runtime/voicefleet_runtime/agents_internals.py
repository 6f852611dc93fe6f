"""Every private livekit-agents name the runtime relies on, in one place (livekit-agents 1.8.x).

livekit-agents exposes no public way to learn these; each use below says why we need it.
The accessors read the names directly, without `getattr(..., default)`: a renamed attribute
raises instead of silently answering a default (a `/ready` that says 200 while reconnecting).
tests/unit/test_agents_internals.py checks each name against the installed livekit-agents, so an
upgrade that renames or changes one fails a test. CountingAgentServer (worker.py) also overrides
two private methods, `_get_effective_load` and `_is_available`; tests/unit/test_runtime_capacity.py
checks those against AgentServer's source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Not exported by livekit.agents: the small aiohttp server livekit-agents runs its own health
# endpoint on. The worker serves /metrics, /ready and /admission on one like it.
from livekit.agents.utils.http_server import HttpServer

if TYPE_CHECKING:
    from livekit.agents import AgentServer, JobContext

__all__ = [
    "HttpServer",
    "dispatch_received_at",
    "drop_inference_runners",
    "is_reconnecting",
    "worker_load",
]


def is_reconnecting(server: AgentServer) -> bool:
    """True from each (re)connect to LiveKit until the register response (`_connecting`).

    A worker that is reconnecting is not ready: LiveKit cannot offer it jobs."""
    return bool(server._connecting)


def dispatch_received_at(ctx: JobContext) -> float:
    """Wall-clock time the worker received the job offer (`_info.received_at`), 0.0 if unknown.

    The start of a call's latency figures (dispatch → greeting) and of the call record."""
    return float(ctx._info.received_at or 0.0)


def worker_load(server: AgentServer) -> float:
    """The load the server last computed with its load function (`_worker_load`)."""
    return float(server._worker_load)


def drop_inference_runners(methods: set[str]) -> None:
    """Unregister inference runners (`_InferenceRunner.registered_runners`) a worker won't use.

    Importing the turn-detector plugin registers both models' runners, and the inference process
    loads every registered one: an unused model costs memory and needs its files."""
    from livekit.agents.inference_runner import _InferenceRunner

    for method in methods:
        _InferenceRunner.registered_runners.pop(method, None)
