"""`python -m voicefleet_operator`: run the operator with settings from the environment.

Settings are VOICEFLEET_* variables (see settings.py; the Helm chart sets them). The operator
serves kopf's liveness probe on VOICEFLEET_LIVENESS_PORT (/healthz) and its Prometheus metrics on
VOICEFLEET_METRICS_PORT (/metrics).

`build()` is the one place where the operator is wired: one `OperatorContext` (context.py), every
handler module registered with it (handlers.py: the VoiceAgent's children, status, autoscaling;
telephony_handlers.py: SIP trunks and dispatch rules; wake.py: the standby that wakes fleets
scaled to zero; secret_watch.py: a rotated Secret reconciles the VoiceAgents naming it), the API
login and cleanup, and kopf's own settings. Handler modules never import each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import kopf
import prometheus_client
from aiohttp import web

from voicefleet_operator import handlers, render, secret_watch, telephony_handlers, wake
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.election import ElectionConfig, LeaderElector, default_identity
from voicefleet_operator.kube import Kube, client_configuration, connection_fields
from voicefleet_operator.metrics import REGISTRY
from voicefleet_operator.settings import PlatformSettings, SettingsError

PERSISTENCE_PREFIX = "voicefleet.dev"
FINALIZER = "voicefleet.dev/finalizer"


def build(
    settings: PlatformSettings, kube: Kube | None = None
) -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings, OperatorContext]:
    """The registry, kopf settings and handler context of one operator run."""
    context = OperatorContext(settings=settings, kube=kube or Kube())
    registry = kopf.OperatorRegistry()
    handlers.register(registry, context)
    telephony_handlers.register(registry, context)
    wake.register(registry, context)
    secret_watch.register(registry, context, handlers.reconcile)
    register_connection(registry, context)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    return registry, kopf_settings, context


def register_connection(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Kopf logs in with the operator's own client's credentials and closes it at the end."""

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The same credentials as the operator's own client (see kube.client_configuration).
        return kopf.ConnectionInfo(**connection_fields(ctx.kube.config))

    @kopf.on.cleanup(registry=registry)
    async def close_client(**_: Any) -> None:
        await ctx.kube.close()


def configure_kopf(kopf_settings: kopf.OperatorSettings, platform: PlatformSettings) -> None:
    """Kopf's own settings: bookkeeping under voicefleet.dev, one operator, quiet Events."""
    persistence = kopf_settings.persistence
    persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PERSISTENCE_PREFIX)
    persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PERSISTENCE_PREFIX, key="last-handled-configuration"
    )
    persistence.finalizer = FINALIZER
    # No kopf peering: one replica runs kopf at a time (the Lease election, election.py).
    kopf_settings.peering.standalone = True
    # Tenants see the operator's own Events; kopf's "handler succeeded" chatter stays in logs.
    kopf_settings.posting.level = logging.WARNING
    # Only our Deployments, filtered by the API server rather than in the operator.
    kopf_settings.watching.label_selectors["apps", "deployments"] = (
        f"{render.LABEL_MANAGED_BY}={render.MANAGED_BY}"
    )
    # Re-establish watches periodically so a silently dead connection cannot stall the operator.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = 60
    # Deleting a VoiceAgent waits for its daemons and timers to end. Kopf otherwise gives them
    # 10 zero-time loop cycles: the standby's daemon closes a LiveKit connection (I/O), so
    # kopf looked again only after the cancellation timeout (10 s), and a timer still in a
    # reconcile after `cancellation_polling` (60 s): deleting 300 VoiceAgents took 100 s.
    kopf_settings.background.instant_exit_timeout = 1.0
    kopf_settings.background.cancellation_polling = 1.0


async def run_operator(
    settings: PlatformSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness: bool = True,
    kubeconfig: str | None = None,
    identity: str | None = None,
    on_lost_leadership: Callable[[], None] | None = None,
) -> None:
    """Run until `stop_flag` is set (or the task is cancelled).

    Credentials: `kubeconfig` if given, else in-cluster, else $KUBECONFIG.

    With `settings.leader_election` this replica stands by (answering /healthz) until it holds
    the Lease, then runs kopf while renewing it; on a clean stop it hands the Lease back. When
    it cannot renew in time it calls `on_lost_leadership` and stops kopf; `main()` passes one
    that ends the process at once, so that nothing of a deposed leader still runs when the
    next one starts (in-process users, such as tests, get kopf cancelled instead).
    """
    kube = Kube(client_configuration(kubeconfig))
    if not settings.leader_election:
        await _run_kopf(settings, kube, stop_flag, ready_flag, liveness)
        return
    # Its own client (own connections): a renewal queued behind a thousand VoiceAgents'
    # reconciles on the shared client missed its deadline, and the leader stepped down under
    # exactly the load it was serving (client-go's users keep the election's client apart too).
    election_kube = Kube(client_configuration(kubeconfig))
    elector = LeaderElector(
        election_kube,
        ElectionConfig(
            name=settings.lease_name,
            namespace=settings.effective_lease_namespace,
            identity=identity or default_identity(),
            lease_seconds=settings.lease_seconds,
            renew_seconds=settings.lease_renew_seconds,
            retry_seconds=settings.lease_retry_seconds,
        ),
    )
    standby_health = await _serve_standby_health(settings.liveness_port) if liveness else None
    try:
        acquired = await elector.acquire(stop_flag)
    finally:
        if standby_health is not None:
            await standby_health.cleanup()
    if not acquired:
        await asyncio.gather(kube.close(), election_kube.close())
        return
    kopf_task = asyncio.create_task(_run_kopf(settings, kube, stop_flag, ready_flag, liveness))
    hold_task = asyncio.create_task(elector.hold())
    try:
        await asyncio.wait({kopf_task, hold_task}, return_when=asyncio.FIRST_COMPLETED)
        if hold_task.done():
            if on_lost_leadership is not None:
                on_lost_leadership()
            return
        kopf_task.result()  # kopf's own failure, if any
    finally:
        for task in (kopf_task, hold_task):
            task.cancel()
        await asyncio.gather(kopf_task, hold_task, return_exceptions=True)
        await elector.release()  # only if this replica still holds it; kopf has stopped
        await asyncio.gather(kube.close(), election_kube.close())


def watched_namespaces(settings: PlatformSettings) -> list[str]:
    """The served namespaces and their worker namespaces (the worker Deployments live there)."""
    served = list(settings.watch_namespaces)
    return served + [render.worker_namespace(n) for n in served]


async def _run_kopf(
    settings: PlatformSettings,
    kube: Kube,
    stop_flag: asyncio.Event | threading.Event | None,
    ready_flag: asyncio.Event | threading.Event | None,
    liveness: bool,
) -> None:
    registry, kopf_settings, _ = build(settings, kube)
    await kopf.operator(
        registry=registry,
        settings=kopf_settings,
        standalone=True,
        clusterwide=not settings.watch_namespaces,
        namespaces=watched_namespaces(settings),
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.liveness_port}/healthz" if liveness else None
        ),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


async def _serve_standby_health(port: int) -> web.AppRunner:
    """/healthz while standing by (kopf serves it once this replica leads)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"role": "standby"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def _exit_at_once() -> None:
    logging.getLogger(__name__).critical(
        "leadership lost: exiting so that only the new leader acts"
    )
    logging.shutdown()
    os._exit(3)


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
    asyncio.run(run_operator(settings, on_lost_leadership=_exit_at_once))
    return 0


if __name__ == "__main__":
    sys.exit(main())
