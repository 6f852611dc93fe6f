"""`python -m voicefleet_operator`: run the operator with settings from the environment.

Settings are VOICEFLEET_* variables (see settings.py; the Helm chart sets them). The operator
serves kopf's liveness probe on VOICEFLEET_LIVENESS_PORT (/healthz) and its Prometheus metrics on
VOICEFLEET_METRICS_PORT (/metrics).
"""

from __future__ import annotations

import asyncio
import sys
import threading

import kopf
import prometheus_client

from voicefleet_operator.handlers import OperatorContext, configure_kopf, register
from voicefleet_operator.kube import Kube, client_configuration
from voicefleet_operator.metrics import REGISTRY
from voicefleet_operator.settings import PlatformSettings, SettingsError


def build(
    settings: PlatformSettings, kube: Kube | None = None
) -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings, OperatorContext]:
    """The registry, kopf settings and handler context of one operator run."""
    context = OperatorContext(settings=settings, kube=kube or Kube())
    registry = kopf.OperatorRegistry()
    register(registry, context)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    return registry, kopf_settings, context


async def run_operator(
    settings: PlatformSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness: bool = True,
    kubeconfig: str | None = None,
) -> None:
    """Run until `stop_flag` is set (or the task is cancelled).

    Credentials: `kubeconfig` if given, else in-cluster, else $KUBECONFIG.
    """
    registry, kopf_settings, _ = build(settings, Kube(client_configuration(kubeconfig)))
    await kopf.operator(
        registry=registry,
        settings=kopf_settings,
        standalone=True,
        clusterwide=not settings.watch_namespaces,
        namespaces=settings.watch_namespaces,
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.liveness_port}/healthz" if liveness else None
        ),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main() -> int:
    try:
        settings = PlatformSettings.from_environment()
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    kopf.configure(
        debug=settings.log_level == "DEBUG",
        verbose=settings.log_level == "DEBUG",
        quiet=settings.log_level in ("WARNING", "ERROR"),
    )
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port, registry=REGISTRY)
    asyncio.run(run_operator(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
