"""Leader election on a Lease (election.py) against an in-memory API server and a fake clock."""

from __future__ import annotations

import asyncio
import copy
import itertools
from typing import Any, cast

import pytest
from voicefleet_operator.election import ElectionConfig, LeaderElector
from voicefleet_operator.kube import Conflict, Kube, KubeError, NotFound

NAMESPACE = "voicefleet-system"
PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/voicefleet"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LeaseServer:
    """The API server's Lease endpoints: create once, PUT only with the current resourceVersion."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.down = False
        self._versions = itertools.count(1)
        self.writes: list[str | None] = []

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        if self.down:
            raise KubeError(method, path, 503, "ServiceUnavailable", "apiserver down")
        if method == "GET":
            assert path == PATH
            if self.lease is None:
                raise NotFound(method, path, 404, "NotFound", "not found")
            return copy.deepcopy(self.lease)
        if method == "POST":
            if self.lease is not None:
                raise Conflict(method, path, 409, "AlreadyExists", "exists")
            self.lease = copy.deepcopy(body)
        elif method == "PUT":
            assert self.lease is not None and path == PATH
            current = self.lease["metadata"]["resourceVersion"]
            if body["metadata"].get("resourceVersion") != current:
                raise Conflict(method, path, 409, "Conflict", "the object has been modified")
            self.lease = copy.deepcopy(body)
        else:
            raise AssertionError(method)
        assert self.lease is not None
        self.lease["metadata"]["resourceVersion"] = str(next(self._versions))
        self.writes.append(self.lease["spec"].get("holderIdentity"))
        return copy.deepcopy(self.lease)

    @property
    def holder(self) -> str | None:
        return None if self.lease is None else self.lease["spec"].get("holderIdentity")


def elector(server: LeaseServer, clock: Clock, identity: str) -> LeaderElector:
    config = ElectionConfig(
        name="voicefleet",
        namespace=NAMESPACE,
        identity=identity,
        lease_seconds=15,
        renew_seconds=10,
        retry_seconds=2,
    )
    return LeaderElector(cast(Kube, server), config, clock=clock)


async def test_the_first_replica_leads_and_the_second_stands_by() -> None:
    server, clock = LeaseServer(), Clock()
    a, b = elector(server, clock, "a"), elector(server, clock, "b")
    assert await a.try_acquire_or_renew()
    assert server.holder == "a" and a.is_leader
    # As long as a renews, b never gets it, however long it tries.
    for _ in range(20):
        clock.advance(2)
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
        assert not b.is_leader
    assert server.holder == "a"
    assert server.lease is not None and server.lease["spec"]["leaseTransitions"] == 0


async def test_a_dead_leader_is_replaced_after_the_lease_duration_seen_by_the_standby() -> None:
    server, clock = LeaseServer(), Clock()
    a, b = elector(server, clock, "a"), elector(server, clock, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # b observes a's record now
    # a is killed: no renewal from here on. b's own clock decides, not the renewTime.
    clock.advance(14)
    assert not await b.try_acquire_or_renew()
    clock.advance(1.5)
    assert await b.try_acquire_or_renew()
    assert server.holder == "b" and b.is_leader
    assert server.lease is not None and server.lease["spec"]["leaseTransitions"] == 1
    # a's process would have exited; were it alive, it would see it lost.
    assert not a.is_leader


async def test_a_leader_that_cannot_renew_stops_before_a_standby_may_take_over() -> None:
    server, clock = LeaseServer(), Clock()
    a, b = elector(server, clock, "a"), elector(server, clock, "b")
    assert await a.try_acquire_or_renew()
    renewed_at = clock()
    assert not await b.try_acquire_or_renew()
    server.down = True  # a cannot reach the API server (b neither, for now)
    clock.advance(10)
    assert not a.is_leader  # gave up after renew_seconds
    assert clock() - renewed_at < 15  # ...before the lease duration b waits for
    server.down = False
    clock.advance(5.5)
    assert await b.try_acquire_or_renew()


async def test_hold_returns_when_renewal_keeps_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    server, clock = LeaseServer(), Clock()
    a = elector(server, clock, "a")
    assert await a.try_acquire_or_renew()
    server.down = True

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await asyncio.wait_for(a.hold(), timeout=5)
    assert clock() >= 1000 + 10


async def test_hold_returns_at_once_when_another_replica_holds_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, clock = LeaseServer(), Clock()
    a = elector(server, clock, "a")
    assert await a.try_acquire_or_renew()
    assert server.lease is not None
    server.lease["spec"]["holderIdentity"] = "intruder"  # e.g. after a long pause of a

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await asyncio.wait_for(a.hold(), timeout=5)
    assert clock() - 1000 < 10  # did not wait for its renew deadline


async def test_of_replicas_racing_for_a_lease_exactly_one_wins() -> None:
    server, clock = LeaseServer(), Clock()
    a, b, c = (elector(server, clock, name) for name in "abc")
    # No Lease yet: both create it, one create fails.
    results = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
    assert sorted(results) == [False, True]
    leader = a if results[0] else b
    # The leader dies; the two standbys read the same expired record and both write it: the
    # resourceVersion lets one through.
    standbys = [replica for replica in (a, b, c) if replica is not leader]
    for replica in standbys:
        assert not await replica.try_acquire_or_renew()
    clock.advance(16)
    writes_before = len(server.writes)
    raced = await asyncio.gather(*(replica.try_acquire_or_renew() for replica in standbys))
    assert sorted(raced) == [False, True]
    assert len(server.writes) == writes_before + 1
    assert server.holder == standbys[raced.index(True)].config.identity


async def test_release_hands_the_lease_over_without_waiting() -> None:
    server, clock = LeaseServer(), Clock()
    a, b = elector(server, clock, "a"), elector(server, clock, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert server.holder is None and not a.is_leader
    assert await b.try_acquire_or_renew()  # at once, no lease duration to wait out
    assert server.holder == "b"


async def test_release_leaves_someone_elses_lease_alone() -> None:
    server, clock = LeaseServer(), Clock()
    a, b = elector(server, clock, "a"), elector(server, clock, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    clock.advance(16)
    assert await b.try_acquire_or_renew()
    await a.release()  # a, deposed, stopping late
    assert server.holder == "b"


def test_timings_must_leave_the_leader_time_to_stop() -> None:
    with pytest.raises(ValueError, match="retry < renew deadline < lease duration"):
        ElectionConfig(name="x", namespace="y", identity="z", lease_seconds=10, renew_seconds=10)
