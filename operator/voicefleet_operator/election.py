"""Leader election on a coordination.k8s.io/v1 Lease: of all operator replicas, one runs kopf.

The algorithm is client-go's (kube-controller-manager, controller-runtime, hence CloudNativePG
and prometheus-operator): the leader renews the Lease every `retry` seconds; a standby takes it
over once it has seen no change of the Lease for `lease` seconds, measured on its own clock from
the moment it observed the last change (no clock comparison between machines). Every write is a
PUT with the resourceVersion read just before, so two replicas can never both win one round.

The leader stops acting before a standby may take over: when it has not renewed for `renew`
seconds (< `lease`) it gives up, and the caller ends the process at once (`__main__`), as
client-go's users do, so no kopf handler of a deposed leader is still writing when the new one
starts. On a clean stop (SIGTERM) the leader hands the Lease back after kopf has stopped, so the
standby takes over within `retry` seconds instead of `lease`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from voicefleet_operator.kube import Conflict, Kube, KubeError, NotFound

log = logging.getLogger(__name__)

LEASE_API = "/apis/coordination.k8s.io/v1"


@dataclass(frozen=True)
class ElectionConfig:
    name: str
    namespace: str
    identity: str
    """This replica (the pod's name in a cluster; unique per process)."""
    lease_seconds: float = 15.0
    """A standby takes over after seeing no renewal for this long."""
    renew_seconds: float = 10.0
    """The leader gives up after failing to renew for this long (must be < lease_seconds)."""
    retry_seconds: float = 2.0
    """How often the leader renews and a standby tries."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_seconds < self.lease_seconds:
            raise ValueError(
                "leader election needs 0 < retry < renew deadline < lease duration, got "
                f"{self.retry_seconds}, {self.renew_seconds}, {self.lease_seconds}"
            )


def default_identity() -> str:
    """POD_NAME when the chart sets it, else host, pid and a random suffix."""
    pod = os.environ.get("POD_NAME")
    if pod:
        return pod
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _micro_time(moment: datetime) -> str:
    """metav1.MicroTime."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


StopFlag = asyncio.Event | threading.Event


def _is_set(flag: StopFlag | None) -> bool:
    return flag is not None and flag.is_set()


class LeaderElector:
    """One replica's side of the election (one instance per process)."""

    def __init__(
        self, kube: Kube, config: ElectionConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renewed: float | None = None
        self.transitions = 0

    @property
    def _path(self) -> str:
        return f"{LEASE_API}/namespaces/{self.config.namespace}/leases/{self.config.name}"

    @property
    def is_leader(self) -> bool:
        renewed = self._last_renewed
        return renewed is not None and self.clock() - renewed < self.config.renew_seconds

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this replica holds the Lease afterwards."""
        config = self.config
        timeout = config.retry_seconds
        # The leader's deadline counts from before its write was sent: conservative.
        started = self.clock()
        now = datetime.now(UTC)
        try:
            lease = await asyncio.wait_for(self.kube.request("GET", self._path), timeout)
        except NotFound:
            lease = None
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": config.name, "namespace": config.namespace},
                "spec": self._spec(now, acquired=now, transitions=0),
            }
            path = f"{LEASE_API}/namespaces/{config.namespace}/leases"
            try:
                await asyncio.wait_for(self.kube.request("POST", path, body=body), timeout)
            except Conflict:
                return False  # another replica created it first
            log.info("leader election: %s acquired new lease %s", config.identity, config.name)
            self._renewed(started)
            return True

        spec = dict(lease.get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        duration = float(spec.get("leaseDurationSeconds") or config.lease_seconds)
        if holder and holder != config.identity and self.clock() < self._observed_at + duration:
            self._last_renewed = None
            return False  # held by a live leader

        ours = holder == config.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        acquired = spec.get("acquireTime") if ours else None
        lease["spec"] = self._spec(now, acquired=acquired or now, transitions=transitions)
        try:
            # The PUT carries the resourceVersion just read: of two replicas, one wins.
            await asyncio.wait_for(self.kube.request("PUT", self._path, body=lease), timeout)
        except Conflict:
            return False
        if not ours:
            log.info("leader election: %s acquired lease %s", config.identity, config.name)
        self._renewed(started)
        return True

    def _spec(self, now: datetime, *, acquired: datetime | str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": max(1, round(self.config.lease_seconds)),
            "acquireTime": acquired if isinstance(acquired, str) else _micro_time(acquired),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def _renewed(self, started: float) -> None:
        self._last_renewed = started
        self._observed = None  # our own write: the next read is a change to observe

    async def _round(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except (KubeError, aiohttp.ClientError, TimeoutError) as error:
            log.warning("leader election: lease %s: %s", self.config.name, error)
            return False

    async def acquire(self, stop_flag: StopFlag | None = None) -> bool:
        """Stand by until this replica holds the Lease (True) or `stop_flag` is set (False)."""
        log.info(
            "leader election: %s standing by for lease %s/%s",
            self.config.identity,
            self.config.namespace,
            self.config.name,
        )
        while not _is_set(stop_flag):
            if await self._round():
                return True
            await asyncio.sleep(self.config.retry_seconds)
        return False

    async def hold(self) -> None:
        """Renew until renewing has failed for `renew_seconds`; returns when leadership is lost
        (at that deadline at the latest: a renewal still in flight then does not count)."""
        config = self.config
        while True:
            renewed_at = self._last_renewed
            remaining = (
                renewed_at + config.renew_seconds - self.clock() if renewed_at is not None else 0
            )
            if remaining <= 0:
                log.error(
                    "leader election: %s lost lease %s (not renewed for %.0fs)",
                    config.identity,
                    config.name,
                    config.renew_seconds,
                )
                return
            await asyncio.sleep(min(config.retry_seconds, remaining))
            remaining = (
                renewed_at + config.renew_seconds - self.clock() if renewed_at is not None else 0
            )
            if remaining > 0:
                try:
                    await asyncio.wait_for(self._round(), remaining)
                except TimeoutError:
                    pass

    async def release(self) -> None:
        """Hand the Lease back (after kopf has stopped), so a standby need not wait it out."""
        if self._last_renewed is None:
            return
        self._last_renewed = None
        try:
            lease = await asyncio.wait_for(
                self.kube.request("GET", self._path), self.config.retry_seconds
            )
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.config.identity:
                return
            spec["holderIdentity"] = None
            spec["leaseDurationSeconds"] = 1
            spec["renewTime"] = _micro_time(datetime.now(UTC))
            lease["spec"] = spec
            await asyncio.wait_for(
                self.kube.request("PUT", self._path, body=lease), self.config.retry_seconds
            )
            log.info(
                "leader election: %s released lease %s", self.config.identity, self.config.name
            )
        except (KubeError, aiohttp.ClientError, TimeoutError) as error:
            log.warning("leader election: releasing lease %s: %s", self.config.name, error)
