"""Session-scoped pytest fixtures for the LiveKit stack (livekit-server, livekit-sip, Prometheus).

Each fixture starts the components it needs that are not already running (`make livekit-up`
may have started them), stops at the end of the session only what it started, and fails the
test loudly with the tail of the component's log when one cannot start. Nothing is skipped.

Import them into a conftest.py (e2e/conftest.py, tests/integration/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.infra import livekit as stack
from e2e.infra.procs import ComponentError
from e2e.infra.prometheus import PrometheusClient

__all__ = ["livekit", "prometheus", "sip"]


def _start(names: tuple[str, ...]) -> stack.UpResult:
    result = stack.UpResult()
    try:
        stack.up(names, result=result)
    except ComponentError as error:
        stack.down(tuple(result.started))
        pytest.fail(f"could not start {', '.join(names)}:\n{error}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def livekit() -> Iterator[stack.LiveKitEndpoint]:
    """livekit-server with Redis: `.url` (host), `.url_for_pods`, `.api_key`, `.api_secret`,
    `.api()` -> livekit-api client (`async with livekit.api() as lkapi: ...`)."""
    result = _start(("redis", "livekit-server"))
    yield stack.LiveKitEndpoint()
    stack.down(tuple(result.started))


@pytest.fixture(scope="session")
def sip(livekit: stack.LiveKitEndpoint) -> Iterator[stack.SipEndpoint]:
    """livekit-sip, registered with livekit-server through Redis: `.host`, `.port` (UDP+TCP)."""
    result = _start(("livekit-sip",))
    yield stack.SipEndpoint()
    stack.down(tuple(result.started))


@pytest.fixture(scope="session")
def prometheus() -> Iterator[PrometheusClient]:
    """Prometheus: `.base_url`, `.query(expr)` -> [Sample(labels, value)], `.active_targets()`,
    `.wait_for_targets(job, labels)`; discovery follows the current cluster's kubeconfig."""
    result = _start(("prometheus",))
    client = PrometheusClient()
    client.sync_discovery()
    yield client
    stack.down(tuple(result.started))
